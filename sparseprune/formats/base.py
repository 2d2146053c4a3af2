"""Common base of the packed weight formats."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


class FormatError(ValueError):
    """A packed tensor is malformed (bad shape, dtype, index or position code)."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise FormatError(msg)


@dataclass
class PackedWeight:
    """A linear weight W [out_features, in_features] stored in a compact sparse format.

    Subclasses are dataclasses whose tensor fields are exactly what gets saved; ``shape`` is the
    logical dense shape. Construction from raw tensors always goes through ``validate()``.
    """

    kind = "packed"
    shape: tuple[int, int]

    # --- generic plumbing over the tensor fields -------------------------------------------------
    @classmethod
    def tensor_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "shape"]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self.tensor_names()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], shape, *, name: str = "weight"):
        missing = [n for n in cls.tensor_names() if n not in tensors]
        _require(not missing, f"{name}: {cls.kind} weight is missing tensors {missing}")
        obj = cls(shape=(int(shape[0]), int(shape[1])), **{n: tensors[n] for n in cls.tensor_names()})
        obj.validate(name=name)
        return obj

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype  # type: ignore[attr-defined]

    @property
    def device(self) -> torch.device:
        return self.values.device  # type: ignore[attr-defined]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def dense_nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.values.element_size()  # type: ignore[attr-defined]

    def to(self, device=None, dtype=None):
        kw = {}
        for n, t in self.tensors().items():
            kw[n] = t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)
        return type(self)(shape=self.shape, **kw)

    def sparsity(self) -> float:
        dense = self.to_dense()
        return 1.0 - dense.count_nonzero().item() / max(dense.numel(), 1)

    # --- to implement ---------------------------------------------------------------------------
    def validate(self, *, name: str = "weight") -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_dense(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
