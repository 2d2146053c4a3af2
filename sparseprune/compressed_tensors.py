"""Interop with the compressed-tensors checkpoints llm-compressor writes ("sparse-24-bitmask").

Layout (one Linear named ``<p>``, dense weight W [N, K] that is 2:4 sparse):

  <p>.shape       int64 [2, 1]           the dense shape (N, K)
  <p>.compressed  W.dtype [N, K/2]       the two kept values of each group of 4, in row-major order
  <p>.bitmask     uint8 [N, ceil(K/8)]   kept positions, one bit per weight, rows packed separately,
                                         little bit order (column 8*b + j is bit j of byte b)
  <p>.bias        as in the dense model; every other tensor is stored dense under its own name.

and in ``config.json``: ``quantization_config`` = {"quant_method": "compressed-tensors",
"sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4", "targets":
["Linear"], "ignore": [<Linear layers left dense>], "global_sparsity": <fraction of zero
weights>}} (older checkpoints put the same block under ``compression_config``).

The bitmask always marks exactly two positions per group (a kept weight may itself be zero), which
is exactly our Semi24 format: ``compressed`` is Semi24 ``values`` as is and the bitmask turns into
the 2-bit position codes. Import validates every tensor and raises ``ValueError`` naming it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from . import autotune
from .checkpoint import CONFIG_NAME, WEIGHTS_NAME
from .checkpoint import read_tensors as _read_weights
from .conv import SparseConv2d
from .formats import FormatError, Semi24Weight
from .modules import SparseLinear, replace_module, tune_model
from .prune.patterns import Pattern, satisfies
from .prune.select import tied_parameter_names
from .report import LayerReport, Report

FORMAT = "sparse-24-bitmask"
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --- bitmask <-> bool mask ---------------------------------------------------------------------
def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """Bool [N, K] -> uint8 [N, ceil(K/8)], little bit order per row (numpy.packbits(..., 'little'))."""
    n, k = mask.shape
    nbytes = (k + 7) // 8
    bits = torch.zeros(n, nbytes * 8, dtype=torch.uint8, device=mask.device)
    bits[:, :k] = mask.to(torch.uint8)
    weights = (1 << torch.arange(8, device=mask.device, dtype=torch.int32))
    return (bits.reshape(n, nbytes, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_bitmask(bitmask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [N, B] -> (bool [N, K], bool [N, 8B - K] pad bits)."""
    shifts = torch.arange(8, device=bitmask.device, dtype=torch.uint8)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().reshape(bitmask.shape[0], -1)
    return bits[:, :k], bits[:, k:]


# --- one layer ---------------------------------------------------------------------------------
def semi24_from_bitmask(shape_t, compressed, bitmask, *, name: str = "weight", expected_shape=None) -> Semi24Weight:
    """Validated Semi24Weight from the three compressed-tensors tensors of one layer."""
    def bad(msg):
        return FormatError(f"{name}.{msg}")

    if not isinstance(shape_t, torch.Tensor) or shape_t.is_floating_point() or shape_t.is_complex() \
            or shape_t.dtype == torch.bool or shape_t.numel() != 2:
        raise bad(f"shape must be an integer tensor of 2 elements, got {getattr(shape_t, 'dtype', None)} "
                  f"{tuple(getattr(shape_t, 'shape', ()))}")
    n, k = (int(v) for v in shape_t.reshape(-1).tolist())
    if n <= 0 or k <= 0 or k % 4:
        raise bad(f"shape = ({n}, {k}): needs positive sizes with in_features % 4 == 0")
    if expected_shape is not None and (n, k) != tuple(expected_shape):
        raise bad(f"shape = ({n}, {k}) but the model's layer is {tuple(expected_shape)}")
    if not isinstance(compressed, torch.Tensor) or compressed.dtype not in _FLOAT_DTYPES:
        raise bad(f"compressed must be float32/bfloat16/float16, got {getattr(compressed, 'dtype', None)}")
    if tuple(compressed.shape) != (n, k // 2):
        raise bad(f"compressed has shape {tuple(compressed.shape)}, expected {(n, k // 2)}")
    if not isinstance(bitmask, torch.Tensor) or bitmask.dtype not in (torch.uint8, torch.int8):
        raise bad(f"bitmask must be uint8, got {getattr(bitmask, 'dtype', None)}")
    if tuple(bitmask.shape) != (n, (k + 7) // 8):
        raise bad(f"bitmask has shape {tuple(bitmask.shape)}, expected {(n, (k + 7) // 8)}")
    mask, pad = unpack_bitmask(bitmask.view(torch.uint8), k)
    if pad.any():
        raise bad("bitmask has bits set past the last column")
    per_group = mask.reshape(n, k // 4, 4).sum(-1)
    if (per_group != 2).any():
        r, g = (per_group != 2).nonzero()[0].tolist()
        raise bad(f"bitmask row {r}, group {g} marks {per_group[r, g].item()} of 4 positions (2:4 needs exactly 2)")
    dense = torch.zeros(n, k, dtype=compressed.dtype)
    dense[mask] = compressed.reshape(-1)  # row-major order of the kept positions = compressed's order
    packed = Semi24Weight.from_dense(dense, mask)
    packed.validate(name=name)
    return packed


def semi24_to_bitmask(weight: Semi24Weight) -> dict[str, torch.Tensor]:
    """{"shape", "compressed", "bitmask"} of a Semi24 weight (kept positions straight from meta)."""
    n, k = weight.shape
    meta = weight.meta
    nib = torch.stack([meta & 0xF, meta >> 4], dim=-1).reshape(n, -1)[:, : k // 4].to(torch.int64)
    pos = torch.stack([nib & 3, nib >> 2], dim=-1)  # [N, G, 2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool, device=meta.device).scatter_(2, pos, True).reshape(n, k)
    return {"shape": torch.tensor([n, k], dtype=torch.int64).reshape(-1, 1),
            "compressed": weight.values.detach().cpu().contiguous(),
            "bitmask": pack_bitmask(mask).cpu()}


# --- whole models ------------------------------------------------------------------------------
def _sparsity_config(config: dict) -> dict | None:
    for outer in ("quantization_config", "compression_config"):
        block = config.get(outer)
        if isinstance(block, dict) and isinstance(block.get("sparsity_config"), dict):
            return block["sparsity_config"]
    sc = config.get("sparsity_config")
    return sc if isinstance(sc, dict) else None


def save_compressed_tensors(model: nn.Module, save_dir, *, config: dict | None = None) -> dict:
    """Writes ``model`` as a compressed-tensors "sparse-24-bitmask" checkpoint into ``save_dir``.

    2:4 layers (SparseLinear of kind semi24, hybrid, or any whose dense weight is 2:4 in the
    model's input order) become ``<name>.shape/.compressed/.bitmask``; block-sparse and plain
    Linear layers are stored dense and listed in ``ignore``. ``config.json`` is ``config`` (default:
    ``model.config.to_dict()`` for transformers models, else {}) plus the quantization_config block.
    Returns the sparsity_config written.
    """
    from safetensors.torch import save_file

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    ignore, handled = [], set()
    zeros = total = 0
    two_four = Pattern("nm", 2, 4)
    for name, mod in model.named_modules():
        if isinstance(mod, SparseLinear):
            handled.update(f"{name}.{k}" for k in mod.state_dict())
            if mod.bias is not None:
                out[f"{name}.bias"] = mod.bias.detach().cpu().contiguous()
            if mod.kind == "semi24" and mod.in_perm is None:
                packed = mod.packed_weight()
            else:
                dense = mod.to_dense()
                packed = Semi24Weight.from_dense(dense) if satisfies(dense, two_four, None) else None
                if packed is None:
                    ignore.append(name)
                    out[f"{name}.weight"] = dense.cpu().contiguous()
            if packed is not None:
                for key, t in semi24_to_bitmask(packed).items():
                    out[f"{name}.{key}"] = t
            w = mod.to_dense()
        elif isinstance(mod, SparseConv2d):
            # compressed-tensors targets Linear layers only: a sparse conv is written as its dense
            # (masked) weight, as the dense model's nn.Conv2d holds it
            handled.update(f"{name}.{k}" for k in mod.state_dict())
            out[f"{name}.weight"] = mod.to_dense().cpu().contiguous()
            if mod.bias is not None:
                out[f"{name}.bias"] = mod.bias.detach().cpu().contiguous()
            continue
        elif isinstance(mod, nn.Linear):
            ignore.append(name)
            w = mod.weight.detach()
        else:
            continue
        zeros += int((w == 0).sum())
        total += w.numel()
    seen = {}
    for key, t in state.items():
        if key in handled or key in out:
            continue
        ptr = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if ptr is not None and ptr in seen:
            continue  # tied weight: written once, as transformers' loaders expect
        if ptr is not None:
            seen[ptr] = key
        out[key] = t.detach().cpu().contiguous()
    save_file(out, os.fspath(save_dir / WEIGHTS_NAME), metadata={"format": "pt"})

    sparsity_config = {"format": FORMAT, "sparsity_structure": "2:4", "targets": ["Linear"],
                       "ignore": ignore, "global_sparsity": zeros / max(total, 1),
                       "registry_requires_subclass": False}
    if config is None:
        cfg_obj = getattr(model, "config", None)
        config = cfg_obj.to_dict() if hasattr(cfg_obj, "to_dict") else {}
    config = dict(config)
    qc = dict(config.get("quantization_config") or {})
    qc.update({"quant_method": "compressed-tensors", "sparsity_config": sparsity_config})
    config["quantization_config"] = qc
    with open(save_dir / CONFIG_NAME, "w") as f:
        json.dump(config, f, indent=2, default=str)
    return sparsity_config


def load_compressed_tensors(path, model: nn.Module, *, backend: str = "auto", strict: bool = True) -> nn.Module:
    """Loads a "sparse-24-bitmask" checkpoint (a directory with config.json and safetensors, or
    one safetensors file) into a freshly built dense ``model``: each compressed Linear becomes a
    SparseLinear (no re-pruning, no dense detour for the weights kept), the rest loads dense.
    """
    path = Path(path)
    if path.is_dir():
        cfg_file = path / CONFIG_NAME
        if not cfg_file.is_file():
            raise ValueError(f"{path}: no {CONFIG_NAME}")
        try:
            sc = _sparsity_config(json.loads(cfg_file.read_text()))
        except ValueError as e:
            raise ValueError(f"{cfg_file}: not valid JSON ({e})") from e
        if sc is None:
            raise ValueError(f"{cfg_file}: no sparsity_config (not a compressed-tensors sparse checkpoint)")
        if sc.get("format") != FORMAT:
            raise ValueError(f"{cfg_file}: sparsity format {sc.get('format')!r} is not supported; sparseprune reads "
                             f"{FORMAT!r} (for 'dense', load the weights and call sparseprune.convert(model, '2:4'))")
        if sc.get("sparsity_structure", "2:4") != "2:4":
            raise ValueError(f"{cfg_file}: sparsity_structure {sc.get('sparsity_structure')!r} is not '2:4'")
    tensors = _read_weights(path)
    prefixes = sorted(k[: -len(".bitmask")] for k in tensors if k.endswith(".bitmask"))
    report = Report(pattern="2:4", method="compressed-tensors")
    used: set[str] = set()
    new = {}
    for name in prefixes:
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"{name}: compressed in the checkpoint but the model has no such module") from e
        if not isinstance(old, nn.Linear):
            raise ValueError(f"{name}: compressed in the checkpoint but the model's module is {type(old).__name__}")
        keys = {part: f"{name}.{part}" for part in ("shape", "compressed", "bitmask")}
        for part, key in keys.items():
            if key not in tensors:
                raise FormatError(f"{key}: missing (a sparse-24-bitmask layer needs shape, compressed and bitmask)")
        packed = semi24_from_bitmask(tensors[keys["shape"]], tensors[keys["compressed"]], tensors[keys["bitmask"]],
                                     name=name, expected_shape=(old.out_features, old.in_features))
        used.update(keys.values())
        bias = None
        if old.bias is not None:
            key = f"{name}.bias"
            if key not in tensors:
                raise ValueError(f"{key}: missing")
            bias = tensors[key]
            if tuple(bias.shape) != (old.out_features,) or not bias.is_floating_point():
                raise ValueError(f"{key}: expected a float tensor of shape ({old.out_features},), "
                                 f"got {bias.dtype} {tuple(bias.shape)}")
            used.add(key)
        device = old.weight.device
        sparse = SparseLinear(packed.to(device=device, dtype=old.weight.dtype),
                              None if bias is None else bias.to(device), backend=backend)
        new[name] = sparse
        report.layers.append(LayerReport(name, packed.shape, "loaded", "2:4", backend=sparse.backend,
                                         bytes_ratio=packed.nbytes / packed.dense_nbytes))
    for name, sparse in new.items():
        replace_module(model, name, sparse)
    rest = {k: v for k, v in tensors.items() if k not in used}
    sparse_keys = {f"{n}.{k}" for n, m in new.items() for k in m.state_dict()}
    tied = tied_parameter_names(model)
    try:
        missing, unexpected = model.load_state_dict(rest, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{path}: dense tensors do not fit the model: {e}") from e
    missing = [k for k in missing if k not in sparse_keys and k not in tied]
    if strict and (missing or unexpected):
        raise ValueError(f"{path} does not match the model: missing {missing[:10]}, unexpected {unexpected[:10]}")
    if backend == "auto" and new:
        autotune.note_plans(report, tune_model(model), new)
    model.sparseprune_report = report
    return model
