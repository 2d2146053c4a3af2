"""What convert()/prune() did, layer by layer."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    status: str  # "converted", "pruned", "packed-as-is", "skipped"
    pattern: str = ""
    sparsity: float | None = None  # fraction of weights that are zero after pruning
    backend: str | None = None
    bytes_ratio: float | None = None  # packed bytes / dense bytes
    reason: str = ""


@dataclass
class Report:
    pattern: str
    method: str
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def converted(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.status != "skipped"]

    @property
    def skipped(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.status == "skipped"]

    def __getitem__(self, name: str) -> LayerReport:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {"pattern": self.pattern, "method": self.method, "layers": [vars(layer) for layer in self.layers]}

    def __str__(self) -> str:
        head = f"sparseprune: pattern={self.pattern} method={self.method}: {len(self.converted)} layers sparse, {len(self.skipped)} left dense"
        rows = [head, f"{'layer':40s} {'shape':>12s} {'status':>13s} {'sparsity':>8s} {'bytes':>6s} {'backend':>8s}  note"]
        for lr in self.layers:
            sp = "" if lr.sparsity is None else f"{lr.sparsity:.3f}"
            br = "" if lr.bytes_ratio is None else f"{lr.bytes_ratio:.3f}"
            shape = f"{lr.shape[0]}x{lr.shape[1]}"
            rows.append(f"{lr.name:40s} {shape:>12s} {lr.status:>13s} {sp:>8s} {br:>6s} {lr.backend or '':>8s}  {lr.reason}")
        return "\n".join(rows)
