"""vLLM plugin: serves directories written by ``sparseprune.save_pretrained`` with our kernels.

vLLM loads it in every process it starts (engine, tensor-parallel workers) through the
``vllm.general_plugins`` entry point in pyproject.toml, which calls :func:`register`. That
registers the quantization method ``sparseprune``; vLLM then picks it from the directory's
``config.json`` (``quantization_config.quant_method``), or from ``quantization="sparseprune"``.

Per linear layer of the vLLM model (column-, row-, merged gate/up-, QKV-parallel or replicated):

* Layers the checkpoint holds dense (``lm_head``, layers convert() skipped) use vLLM's own
  unquantized method.
* Otherwise the layer's *constituents* are the checkpoint layers vLLM fuses into it (q/k/v_proj
  into qkv_proj, gate/up_proj into gate_up_proj; or the layer itself). ``create_weights`` registers
  empty placeholders (``values``, ``meta``, ``crow``, ``col``, ``in_perm``, and ``weight`` for a
  constituent stored dense) whose loader collects each constituent's full tensors as vLLM streams
  them. When a constituent is complete its tensors are validated exactly as ``sparseprune.load``
  validates them (before any kernel can see them), and this rank's slice is cut out on format
  boundaries (``sharding.py``). The misaligned cases are refused when the layer is built.
* ``process_weights_after_loading`` stacks the rank's slices (gate and up become one packed weight)
  into :class:`~sparseprune.modules.SparseLinear` modules on the layer's device; ``apply`` calls
  them, so the backend registry chooses the kernels as it does outside vLLM (C++ on CPU, CUDA or
  Triton on a GPU, re-packed for the GPU layout by the backend's ``prepare``).

The backend of each layer is the one recorded at convert() time when it can run on this device,
else "auto"; ``SPARSEPRUNE_VLLM_BACKEND=<name>`` overrides it for every layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import Parameter
from vllm.distributed import tensor_model_parallel_all_gather
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.utils import set_weight_attrs

from .. import backends as _backends
from ..checkpoint import FORMAT_NAME, _layer_settings, check_config, read_layer
from ..formats import FORMATS
from ..modules import SparseLinear
from . import sharding

logger = init_logger(__name__)
QUANT_NAME = FORMAT_NAME  # "sparseprune": quantization_config.quant_method and vLLM's quantization=
BACKEND_ENV = "SPARSEPRUNE_VLLM_BACKEND"
# Largest tensor_parallel_size listed in a misalignment error's "sizes that work".
_MAX_TP_LISTED = 64


def register() -> None:
    """The ``vllm.general_plugins`` entry point (called once per vLLM process; idempotent)."""
    register_quantization_config(QUANT_NAME)(SparsePruneConfig)


# --- how a vLLM layer splits across ranks ----------------------------------------------------------
@dataclass
class _Split:
    """The logical shards of a layer (q/k/v, gate/up or one) and this rank's piece of each.

    axis: "rows" (column-parallel: each rank holds output rows), "cols" (row-parallel: input
    columns) or None (replicated). totals[i]: full size of shard i along the axis; sizes[i]: the
    per-rank piece; ranks[i]: which piece this rank holds (kv heads are replicated when the TP size
    exceeds their count, so ranks share a piece).
    """

    axis: str | None
    totals: list[int]
    sizes: list[int]
    ranks: list[int]

    def piece(self, i: int, offset: int = 0) -> tuple[int, int]:
        start = offset + self.ranks[i] * self.sizes[i]
        return start, start + self.sizes[i]


def _split(layer, tp: int, rank: int) -> _Split | None:
    """How ``layer`` splits for ``tp`` ranks (None where vLLM itself cannot split it that way)."""
    kind = type(layer)
    if kind is QKVParallelLinear:
        heads, kv, hs, vhs = layer.total_num_heads, layer.total_num_kv_heads, layer.head_size, layer.v_head_size
        if heads % tp or (tp >= kv and tp % kv) or (tp < kv and kv % tp):
            return None
        kv_here, replicas = (1, tp // kv) if tp >= kv else (kv // tp, 1)
        return _Split("rows", [heads * hs, kv * hs, kv * vhs], [heads // tp * hs, kv_here * hs, kv_here * vhs],
                      [rank, rank // replicas, rank // replicas])
    if kind is MergedColumnParallelLinear:
        totals = list(layer.output_sizes)
    elif kind is ColumnParallelLinear:
        totals = [layer.output_size]
    elif kind is RowParallelLinear:
        if layer.input_size % tp:
            return None
        return _Split("cols", [layer.input_size], [layer.input_size // tp], [rank])
    elif kind is ReplicatedLinear:
        return _Split(None, [layer.output_size], [layer.output_size], [0])
    else:
        raise NotImplementedError(f"sparseprune: vLLM layer type {kind.__name__} ({layer.prefix}) has no sparse "
                                  f"loading; convert() its checkpoint layers with exclude=[...] to keep them dense")
    if any(t % tp for t in totals):
        return None
    return _Split("rows", totals, [t // tp for t in totals], [rank] * len(totals))


# --- constituents: the checkpoint layers one vLLM layer is built from ------------------------------
@dataclass
class _Constituent:
    name: str                # checkpoint layer name
    cfg: dict | None         # its sparseprune layer config; None = stored dense (``.weight``)
    shards: list[int]        # the logical shards of the vLLM layer it holds (all of them if fused on disk)
    offsets: list[int]       # where each of those starts in it, along the split axis
    pending: dict[str, torch.Tensor] = field(default_factory=dict)

    def required(self) -> list[str]:
        if self.cfg is None:
            return ["weight"]
        names = FORMATS[self.cfg["kind"]].tensor_names()
        return names + (["in_perm"] if self.cfg.get("in_perm") else [])

    def describe(self) -> str:
        if self.cfg is None:
            return "dense"
        kind, _, _, bs = _layer_settings(self.name, self.cfg)
        return sharding.describe(kind, bs)


def _check_alignment(layer, constituents: list[_Constituent]) -> None:
    """Refuses (ValueError) a split that does not fall on every sparse constituent's boundaries,
    naming the layer, its format and the tensor_parallel_size values that would work."""

    def misaligned(split: _Split, c: _Constituent) -> tuple[int, int, int] | None:
        kind, _, _, bs = _layer_settings(c.name, c.cfg)
        align = sharding.alignment(kind, bs, split.axis)
        for i, off in zip(c.shards, c.offsets):
            start, stop = split.piece(i, off)
            if start % align or stop % align:
                return start, stop, align
        return None

    split = _split(layer, layer.tp_size, layer.tp_rank)
    if split is None or split.axis is None:
        return  # vLLM refuses this TP size itself, or the layer is not split
    for c in constituents:
        if c.cfg is None:
            continue
        bad = misaligned(split, c)
        if bad is None:
            continue
        start, stop, align = bad
        heads = getattr(layer.quant_config, "attention_heads", None)
        works = []
        for tp in range(1, _MAX_TP_LISTED + 1):
            if heads and (heads[0] % tp or (heads[1] % tp and tp % heads[1])):
                continue  # vLLM splits attention heads evenly (kv heads may be replicated instead)
            if all((s := _split(layer, tp, r)) is not None and misaligned(s, c) is None for r in range(tp)):
                works.append(tp)
        what = "output rows" if split.axis == "rows" else "input columns"
        scope = "this layer and the model's attention heads" if heads else "this layer"
        raise ValueError(
            f"sparseprune: layer {c.name} ({c.describe()}) cannot be split for tensor_parallel_size="
            f"{layer.tp_size}: rank {layer.tp_rank} would hold {what} [{start}, {stop}), but {c.describe()} "
            f"can only be cut at multiples of {align} {what}. tensor_parallel_size values that work "
            f"for {scope}: {works}. Nothing is padded: pick one of those, or convert with a block size that "
            f"divides the per-rank size.")


# --- the quantization config ------------------------------------------------------------------------
class SparsePruneConfig(QuantizationConfig):
    """The ``quantization_config`` sparseprune.save_pretrained writes (per-layer format, shape,
    dtype, block size; see sparseprune/checkpoint.py)."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = check_config(config, "config.json quantization_config")
        for name, cfg in self.config["layers"].items():
            _layer_settings(name, cfg)  # malformed layer entries fail here, before any layer is built
        self.layers: dict[str, dict] = dict(self.config["layers"])
        self.attention_heads: tuple[int, int] | None = None  # (query, kv) heads, see maybe_update_config

    def get_name(self) -> str:
        return QUANT_NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        # GPUs: the CUDA backend is built for sm_80 and newer (mma.sp); CPUs report no capability.
        return 80

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the config lives in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "SparsePruneConfig":
        return cls(config)

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        """Keeps the model's attention head counts: the TP sizes a misalignment error suggests must
        also split the heads."""
        text = getattr(hf_config, "get_text_config", lambda: hf_config)()
        heads = getattr(text, "num_attention_heads", None)
        if isinstance(heads, int) and heads > 0:
            kv = getattr(text, "num_key_value_heads", None) or heads
            self.attention_heads = (heads, kv)

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        """Renames the layers the way vLLM renames the model's weights (models whose vLLM module
        names differ from the checkpoint's)."""
        mapped = {}
        for name, cfg in self.layers.items():
            new = hf_to_vllm_mapper.map_name(name + ".values")
            if new is not None:
                mapped[new[: -len(".values")]] = cfg
        self.layers = mapped

    def _constituents(self, layer, prefix: str) -> list[_Constituent]:
        split_rows = type(layer) in (QKVParallelLinear, MergedColumnParallelLinear)
        n_shards = 3 if type(layer) is QKVParallelLinear else \
            len(layer.output_sizes) if type(layer) is MergedColumnParallelLinear else 1
        base, _, last = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(last)
        if prefix in self.layers or not parts or not split_rows:
            # stored under the vLLM layer's own name (fused on disk, or not a fused layer)
            totals = _split(layer, 1, 0).totals if split_rows else [0]
            offsets = [sum(totals[:i]) for i in range(n_shards)]
            return [_Constituent(prefix, self.layers.get(prefix), list(range(n_shards)), offsets)]
        if len(parts) != n_shards:
            raise ValueError(f"sparseprune: {prefix} fuses {parts} but vLLM splits it in {n_shards} shards")
        names = [f"{base}.{p}" if base else p for p in parts]
        return [_Constituent(n, self.layers.get(n), [i], [0]) for i, n in enumerate(names)]

    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if not isinstance(layer, LinearBase):
            base, _, last = prefix.rpartition(".")
            fused = [f"{base}.{p}" if base else p for p in self.packed_modules_mapping.get(last, [])]
            sparse = [n for n in [prefix, *fused] if n in self.layers]
            if sparse:
                raise ValueError(f"sparseprune: {sparse[0]} is stored sparse, but vLLM builds {prefix} as a "
                                 f"{type(layer).__name__}, which has no sparse kernels (the LM head and embeddings "
                                 f"are served dense): convert() with exclude=[{prefix.rpartition('.')[2]!r}]")
            return None
        constituents = self._constituents(layer, prefix)
        if all(c.cfg is None for c in constituents):
            return UnquantizedLinearMethod()
        return SparsePruneLinearMethod(self, constituents)


# --- the linear method -------------------------------------------------------------------------------
class _DensePart(nn.Module):
    """A constituent stored dense inside a fused layer whose other constituents are sparse."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight)


def _backend_for(cfg: dict, device: torch.device, packed) -> str:
    forced = os.environ.get(BACKEND_ENV)
    if forced:
        return forced
    recorded = cfg.get("backend") or "auto"
    if recorded != "auto":
        try:
            if _backends.get_backend(recorded).unsupported_reason(packed, device) is None:
                return recorded
        except ValueError:
            pass
    return "auto"


class SparsePruneLinearMethod(LinearMethodBase):
    """Packed weights for one vLLM linear layer (see the module docstring)."""

    def __init__(self, quant_config: SparsePruneConfig, constituents: list[_Constituent]):
        self.quant_config = quant_config
        self.constituents = constituents

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        _check_alignment(layer, self.constituents)
        split = _split(layer, layer.tp_size, layer.tp_rank)
        for c in self.constituents:
            rows = sum(split.totals[i] for i in c.shards) if split.axis == "rows" else output_size
            shape = (rows, input_size)
            got = tuple(c.cfg["shape"]) if c.cfg is not None else None
            if got is not None and got != shape:
                raise ValueError(f"sparseprune: checkpoint layer {c.name} is {got[0]}x{got[1]}, but vLLM's "
                                 f"{layer.prefix} expects {shape[0]}x{shape[1]} for it")
        layer.sparseprune_split = split
        layer.sparseprune_pieces = {}  # logical shard -> (packed piece or dense tensor, in_perm, cfg)
        layer.sparseprune_dtype = params_dtype
        layer.sparseprune_gather = None  # row-parallel only: input indices to all-gather (see _finish)
        names = sorted({n for c in self.constituents for n in c.required()})
        for name in names:
            # Empty placeholders: the loader keeps what arrives; the real tensors are built per rank.
            dtype = {"meta": torch.uint8, "crow": torch.int32, "col": torch.int32, "in_perm": torch.int64}.get(
                name, params_dtype)
            param = Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
            layer.register_parameter(name, param)
            set_weight_attrs(param, {"weight_loader": self._loader(layer, name)})
            layer.sparseprune_device = param.device  # vLLM builds the model under its target device

    def _loader(self, layer, tensor_name: str):
        def load(param, loaded_weight: torch.Tensor, shard_id=None):
            c = self._constituent_for(layer, shard_id)
            if tensor_name not in c.required():
                raise ValueError(f"sparseprune: {c.name} ({c.describe()}) has no tensor {tensor_name!r}, "
                                 f"but the checkpoint holds {c.name}.{tensor_name}")
            c.pending[tensor_name] = loaded_weight
            if all(n in c.pending for n in c.required()):
                self._finish(layer, c)
        return load

    def _constituent_for(self, layer, shard_id) -> _Constituent:
        if shard_id is None:
            if len(self.constituents) == 1:
                return self.constituents[0]
        else:
            index = {"q": 0, "k": 1, "v": 2}.get(shard_id, shard_id)
            for c in self.constituents:
                if c.shards == [index]:
                    return c
        raise ValueError(f"sparseprune: {layer.prefix} got a tensor for shard {shard_id!r}, which does not match "
                         f"how it is stored ({[c.name for c in self.constituents]})")

    def _finish(self, layer, c: _Constituent) -> None:
        """Validates a complete constituent and keeps this rank's piece of each shard it holds."""
        split: _Split = layer.sparseprune_split
        tensors, c.pending = c.pending, {}
        if c.cfg is None:
            w = tensors["weight"]
            for i, off in zip(c.shards, c.offsets):
                start, stop = split.piece(i, off)
                piece = w[start:stop] if split.axis == "rows" else w[:, start:stop] if split.axis == "cols" else w
                layer.sparseprune_pieces[i] = (_owned(piece.contiguous()), None, None)
            return

        def take(key):
            tensor_name = key.rpartition(".")[2]
            if tensor_name not in tensors:
                raise ValueError(f"{key}: missing from the checkpoint")
            return tensors[tensor_name]

        # The bias is a vLLM parameter with its own loader; the rest is validated as load() does.
        packed, _, in_perm = read_layer(c.name, {**c.cfg, "bias": False}, take)
        for i, off in zip(c.shards, c.offsets):
            start, stop = split.piece(i, off)
            if split.axis == "rows":
                piece, perm = sharding.take_rows(packed, start, stop), in_perm
            elif split.axis == "cols":
                piece, perm = sharding.take_cols(packed, start, stop), in_perm
                if perm is not None and split.sizes[0] != split.totals[0]:
                    # The rank's packed columns read the inputs perm[start:stop]. When they all lie in
                    # the rank's own input slice the permutation stays local; otherwise the rank needs
                    # inputs other ranks hold, and apply() all-gathers the input first.
                    wanted = perm[start:stop].to(torch.int64)
                    if bool(((wanted < start) | (wanted >= stop)).any()):
                        layer.sparseprune_gather = wanted
                        perm = None
                    else:
                        perm = wanted - start
            else:
                piece, perm = packed, in_perm
            layer.sparseprune_pieces[i] = (_compact(piece), perm, c.cfg)

    def process_weights_after_loading(self, layer) -> None:
        pieces = layer.sparseprune_pieces
        missing = [f"{c.name}.{n}" for c in self.constituents if any(i not in pieces for i in c.shards)
                   for n in c.required() if n not in c.pending]
        if missing:
            raise ValueError(f"sparseprune: {layer.prefix}: tensors missing from the checkpoint: {missing}")
        device, dtype = layer.sparseprune_device, layer.sparseprune_dtype
        # This rank's piece of each logical shard, in order, on the layer's device and dtype.
        ordered = [(w.to(device=device, dtype=dtype), None if perm is None else perm.to(device), cfg)
                   for w, perm, cfg in (pieces[i] for i in sorted(pieces))]
        # One SparseLinear over the stacked pieces (one kernel call) when they share a format, block
        # size and input permutation; otherwise one module per piece and the outputs concatenated.
        sparse = [w for w, _, cfg in ordered if cfg is not None]
        if len(sparse) == len(ordered) and all(
                (w.kind, getattr(w, "block_size", None)) == (sparse[0].kind, getattr(sparse[0], "block_size", None))
                and _same_perm(perm, ordered[0][1]) for w, perm, _ in ordered):
            groups = [ordered]
        else:
            groups = [[p] for p in ordered]
        parts: list[nn.Module] = []
        for group in groups:
            w, perm, cfg = group[0]
            if cfg is None:
                parts.append(_DensePart(w))
                continue
            packed = sharding.cat_rows([p[0] for p in group])
            parts.append(SparseLinear(packed, None, backend=_backend_for(cfg, device, packed), in_perm=perm))
        for name in {n for c in self.constituents for n in c.required()}:
            delattr(layer, name)  # the empty placeholders; the modules below hold the weights
        del layer.sparseprune_pieces
        if layer.sparseprune_gather is not None:
            layer.sparseprune_gather = layer.sparseprune_gather.to(device)
            logger.warning("sparseprune: the input permutation of %s crosses tensor-parallel ranks; each call "
                           "all-gathers the layer's input (convert without permute=True to avoid it)",
                           self.constituents[0].name)
        layer.sparseprune = nn.ModuleList(parts)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        parts = layer.sparseprune
        gather = layer.sparseprune_gather
        if gather is not None:
            # row-parallel layer whose input permutation crosses ranks (see _finish): one all-gather
            # of the input per call, then this rank's permuted inputs.
            x = tensor_model_parallel_all_gather(x, dim=-1).index_select(-1, gather)
        out = parts[0](x) if len(parts) == 1 else torch.cat([p(x) for p in parts], dim=-1)
        if bias is not None:
            out = out + bias
        return out


def _owned(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied if it is a view into a larger tensor (a rank's slice of a checkpoint tensor):
    the rank keeps its piece, not the whole layer."""
    return t.clone() if t.untyped_storage().nbytes() > t.numel() * t.element_size() else t


def _compact(w):
    return type(w)(shape=w.shape, **{n: _owned(t) for n, t in w.tensors().items()})


def _same_perm(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a, b)


def sparse_layers(model: nn.Module) -> dict[str, list[str]]:
    """{vLLM layer name: [format of each part ("semi24", "bsr", "hybrid", "dense")]} for every layer
    this plugin built, and {name + ":backends": [backend names]}; a layer still holding unloaded
    placeholders is listed as {name + ":placeholders_left": True}. For checks and debugging:
    ``llm.apply_model(sparse_layers)`` returns one such dict per worker."""
    out: dict = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, LinearBase):
            continue
        if hasattr(mod, "sparseprune"):
            out[name] = [p.kind if isinstance(p, SparseLinear) else "dense" for p in mod.sparseprune]
            out[name + ":backends"] = sorted({p.backend for p in mod.sparseprune if isinstance(p, SparseLinear)})
        if isinstance(mod.quant_method, SparsePruneLinearMethod) and not hasattr(mod, "sparseprune"):
            out[name + ":placeholders_left"] = True
    return out
