"""Checkpoints of converted models: ``save(model, path)`` and ``load(path, model)``.

One safetensors file holds the model's ``state_dict`` as it is after convert(): the packed tensors
of each SparseLinear and SparseConv2d (``<layer>.values``, ``.meta``, ``.crow``, ``.col``, ``.bias``,
``.in_perm``) and the dense tensors of everything else. Its metadata key ``"sparseprune"`` holds a JSON config:

    {"format": "sparseprune", "version": 1, "pattern": "2:4", "method": "magnitude",
     "layers": {"model.layers.0.mlp.up_proj": {"kind": "semi24", "shape": [128, 64],
                "dtype": "float32", "block_size": null, "backend": "auto", "bias": false,
                "in_perm": false}, ...,
                "conv1": {"kind": "semi24", "shape": [64, 576], ..., "conv": {"in_channels": 64,
                          "kernel_size": [3, 3], "stride": [1, 1], "dilation": [1, 1], "padding": [1, 1],
                          "padding_mode": "zeros"}}},
     "aliases": {"lm_head.weight": "model.embed_tokens.weight"},
     "channel": {"modules": {"model.layers.0.mlp.down_proj": {"params": {"weight": [64, 48]},
                             "buffers": {}, "attrs": {"in_features": 48, "out_features": 64}}, ...},
                 "config": {"intermediate_size": 48}}}

``"channel"`` (present after structured pruning, see :mod:`sparseprune.prune.channel`) lists the
modules whose shapes changed; ``load`` rebuilds those shapes on the freshly built model (and its
transformers config) before loading the tensors, so per-layer widths that no config can express
come back too.

Loading never unpickles anything, and every packed tensor is validated (shapes, dtypes, index
ranges, position codes) on CPU before it reaches a module or a kernel; a bad file raises
``ValueError`` (``FormatError`` for packed tensors) naming the tensor.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from torch import nn

from . import autotune
from .conv import SparseConv2d
from .formats import FORMATS
from .formats.conv import ConvGeometry, gemm_shape
from .modules import PackedModule, SparseLinear, replace_module, tune_model
from .prune.channel import RECORD_ATTR, apply_record
from .report import LayerReport, Report

FORMAT_NAME = "sparseprune"
FORMAT_VERSION = 1
META_KEY = "sparseprune"
_FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def build_config(model: nn.Module) -> dict:
    """The JSON config save() writes (pattern, method and per-layer settings)."""
    report = getattr(model, "sparseprune_report", None)
    layers = {}
    for name, mod in model.named_modules():
        if isinstance(mod, PackedModule):
            w = mod.packed_weight()
            layers[name] = {
                "kind": mod.kind,
                "shape": [mod.out_features, mod.in_features],
                "dtype": _dtype_name(mod.dtype),
                "block_size": list(w.block_size) if hasattr(w, "block_size") else None,
                "backend": mod.backend_request,
                "bias": mod.bias is not None,
                "in_perm": mod.in_perm is not None,
            }
            if isinstance(mod, SparseConv2d):  # the GEMM weight's conv (shape is [O, kh*kw*C])
                layers[name]["conv"] = mod.geometry.to_dict()
    config = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
              "pattern": getattr(report, "pattern", None), "method": getattr(report, "method", None),
              "layers": layers}
    channel = getattr(model, RECORD_ATTR, None)
    if channel:
        config["channel"] = channel
    return config


def state_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state_dict on CPU, contiguous, each tensor once: ({name: tensor}, aliases).

    A tensor shared between modules (tied embeddings) is kept under its first name; the others
    are listed in ``aliases`` ({name: first name}).
    """
    tensors: dict[str, torch.Tensor] = {}
    first_by_view: dict[tuple, str] = {}
    storages: set[tuple] = set()
    aliases = {}
    for key, t in model.state_dict(keep_vars=False).items():
        t = t.detach()
        if t.numel():
            storage = (t.device, t.untyped_storage().data_ptr())
            view = (*storage, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if view in first_by_view:  # the same tensor under two names (tied weights)
                aliases[key] = first_by_view[view]
                continue
            first_by_view[view] = key
            if storage in storages:  # a different view of a storage already written: own copy
                t = t.clone()
            storages.add(storage)
        tensors[key] = t.to("cpu").contiguous()
    return tensors, aliases


def save(model: nn.Module, path, *, metadata: dict[str, str] | None = None) -> dict:
    """Writes ``model`` (converted or partly converted) to a safetensors file; returns the config.

    Tensors shared between modules (tied embeddings) are written once; the others are listed as
    aliases in the config. Tensors move to CPU and are made contiguous first.
    """
    from safetensors.torch import save_file

    config = build_config(model)
    tensors, config["aliases"] = state_tensors(model)
    meta = dict(metadata or {})
    meta[META_KEY] = json.dumps(config)
    save_file(tensors, os.fspath(path), metadata=meta)
    return config


def _read(path):
    """(metadata dict, {name: tensor}) from a safetensors file; ValueError if it is not one."""
    from safetensors import safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types for malformed headers/truncation
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    return meta, tensors


def read_config(path) -> dict:
    meta, _ = _read(path)
    return _parse_config(meta, path)


def _parse_config(meta: dict, path) -> dict:
    if META_KEY not in meta:
        raise ValueError(f"{path}: no sparseprune config in the safetensors metadata (was it written by sparseprune.save?)")
    try:
        config = json.loads(meta[META_KEY])
    except ValueError as e:
        raise ValueError(f"{path}: sparseprune config is not valid JSON: {e}") from e
    return check_config(config, path)


def check_config(config, path) -> dict:
    """``config`` if it is a sparseprune config this library reads; ValueError naming ``path`` if not."""
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME or not isinstance(config.get("layers"), dict):
        raise ValueError(f"{path}: sparseprune config is malformed (needs format={FORMAT_NAME!r} and a 'layers' map)")
    if config.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: sparseprune checkpoint version {config.get('version')!r} is not supported "
                         f"(this library reads version {FORMAT_VERSION})")
    return config


def _layer_settings(name: str, cfg) -> tuple[str, tuple[int, int], torch.dtype, tuple | None]:
    if not isinstance(cfg, dict):
        raise ValueError(f"{name}: layer config must be an object, got {type(cfg).__name__}")
    kind = cfg.get("kind")
    if kind not in FORMATS:
        raise ValueError(f"{name}: unknown packed format {kind!r} (known: {sorted(FORMATS)})")
    shape = cfg.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise ValueError(f"{name}: layer shape must be two positive ints, got {shape!r}")
    dtype = _FLOAT_DTYPES.get(cfg.get("dtype"))
    if dtype is None:
        raise ValueError(f"{name}: dtype {cfg.get('dtype')!r} is not one of {sorted(_FLOAT_DTYPES)}")
    bs = cfg.get("block_size")
    if kind != "semi24":
        if not (isinstance(bs, list) and len(bs) == 2 and all(isinstance(b, int) and b > 0 for b in bs)):
            raise ValueError(f"{name}: block_size must be two positive ints for {kind}, got {bs!r}")
        bs = tuple(bs)
    return kind, (shape[0], shape[1]), dtype, bs


def _conv_geometry(name: str, cfg: dict, old: nn.Module) -> ConvGeometry | None:
    """The recorded conv geometry of a layer (None for a linear one), checked against the model's module."""
    if cfg.get("conv") is None:
        return None
    try:
        geom = ConvGeometry.from_dict(cfg["conv"])
    except ValueError as e:
        raise ValueError(f"{name}: conv config is malformed: {e}") from e
    if isinstance(old, SparseConv2d):
        have = old.geometry
    elif isinstance(old, nn.Conv2d) and old.groups == 1:
        have = ConvGeometry.of(old)
    else:
        raise ValueError(f"{name}: expected an nn.Conv2d (groups=1) in the model, found {type(old).__name__}"
                         + (f" with groups={old.groups}" if isinstance(old, nn.Conv2d) else ""))
    if have != geom:
        raise ValueError(f"{name}: the checkpoint's conv is {geom}, the model's is {have}")
    return geom


def read_layer(name: str, cfg, take) -> tuple:
    """(packed weight, bias or None, in_perm or None) of layer ``name`` from its config entry and
    ``take(key)`` (the tensor stored under ``key``; raises if missing), all validated on CPU: the
    packed tensors by their format (FormatError naming the tensor), bias and in_perm by shape,
    dtype and (in_perm) being a permutation."""
    kind, shape, dtype, bs = _layer_settings(name, cfg)
    fmt = FORMATS[kind]
    parts = {tn: take(f"{name}.{tn}") for tn in fmt.tensor_names()}
    if parts["values"].dtype != dtype:
        raise ValueError(f"{name}.values has dtype {parts['values'].dtype}, the config says {dtype}")
    packed = fmt.from_tensors(parts, shape, name=name)  # validates everything (FormatError names the tensor)
    if bs is not None and tuple(packed.block_size) != bs:
        raise ValueError(f"{name}.values holds {packed.block_size} blocks, the config says {bs}")
    bias = take(f"{name}.bias") if cfg.get("bias") else None
    if bias is not None:
        key = f"{name}.bias"
        if bias.dtype != dtype or tuple(bias.shape) != (shape[0],):
            raise ValueError(f"{key} must be {dtype} of shape ({shape[0]},), got {bias.dtype} {tuple(bias.shape)}")
    in_perm = take(f"{name}.in_perm") if cfg.get("in_perm") else None
    if in_perm is not None:
        key = f"{name}.in_perm"
        if in_perm.dtype not in (torch.int64, torch.int32) or tuple(in_perm.shape) != (shape[1],):
            raise ValueError(f"{key} must be int64 of shape ({shape[1]},), got {in_perm.dtype} {tuple(in_perm.shape)}")
        if not torch.equal(in_perm.to(torch.int64).sort().values, torch.arange(shape[1])):
            raise ValueError(f"{key} is not a permutation of range({shape[1]})")
    return packed, bias, in_perm


def load(path, model: nn.Module | None = None, *, backend: str | None = None, strict: bool = True) -> nn.Module:
    """Loads a checkpoint written by :func:`save` (a file) or :func:`save_pretrained` (a directory)
    into a freshly built dense ``model`` (in place).

    Each layer listed in the checkpoint's config must be an ``nn.Linear`` (or SparseLinear) of the
    recorded shape, or for a conv entry an ``nn.Conv2d`` (or SparseConv2d) of the recorded
    geometry; it is replaced by a SparseLinear (SparseConv2d) built from the validated packed
    tensors, on the device that layer was on. The remaining tensors are loaded with ``load_state_dict``.
    ``backend`` overrides the recorded backend request. ``strict``: every model tensor must be in
    the file and every file tensor must be used. For a directory, ``model`` may be omitted: it is
    built from its config.json with transformers (``AutoModelForCausalLM.from_config``). Returns
    ``model``.
    """
    if os.path.isdir(path):
        config, tensors = _read_pretrained(path)
        if model is None:
            model = _model_from_config(path)
    else:
        if model is None:
            raise TypeError(f"{os.fspath(path)} is a single-file checkpoint: pass the dense model to load it into "
                            f"(only a save_pretrained() directory can build its own)")
        meta, tensors = _read(path)
        config = _parse_config(meta, path)
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in tensors:
            raise ValueError(f"{key}: missing from {os.fspath(path)}")
        used.add(key)
        return tensors[key]

    report = Report(pattern=str(config.get("pattern")), method=str(config.get("method")))
    if config.get("channel") is not None:  # structured pruning: rebuild the smaller shapes first
        apply_record(model, config["channel"], where=os.fspath(path))
    new_modules: dict[str, PackedModule] = {}
    for name, cfg in config["layers"].items():
        _, shape, _, _ = _layer_settings(name, cfg)
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"{name}: the checkpoint has a sparse layer the model lacks") from e
        geom = _conv_geometry(name, cfg, old)
        if geom is None and not isinstance(old, (nn.Linear, SparseLinear)):
            raise ValueError(f"{name}: expected an nn.Linear in the model, found {type(old).__name__}")
        old_shape = gemm_shape(old) if isinstance(old, nn.Conv2d) else (old.out_features, old.in_features)
        if old_shape != shape:
            raise ValueError(f"{name}: checkpoint layer is {shape[0]}x{shape[1]} but the model's is "
                             f"{old_shape[0]}x{old_shape[1]}")
        packed, bias, in_perm = read_layer(name, cfg, take)
        device = (old.weight if isinstance(old, (nn.Linear, nn.Conv2d)) else old.values).device
        request = backend or cfg.get("backend") or "auto"
        if not isinstance(request, str):
            raise ValueError(f"{name}: backend must be a string, got {request!r}")
        packed = packed.to(device=device)
        if geom is not None:
            if in_perm is not None:
                raise ValueError(f"{name}: a conv layer has no in_perm")
            sparse = SparseConv2d(packed, geom, None if bias is None else bias.to(device), backend=request)
        else:
            sparse = SparseLinear(packed, None if bias is None else bias.to(device), backend=request,
                                  in_perm=None if in_perm is None else in_perm.to(device))
        new_modules[name] = sparse
        report.layers.append(LayerReport(name, shape, "loaded", report.pattern, backend=sparse.backend,
                                         bytes_ratio=packed.nbytes / packed.dense_nbytes))
    for name, sparse in new_modules.items():
        replace_module(model, name, sparse)

    sparse_keys = {f"{n}.{k}" for n, m in new_modules.items() for k in m.state_dict()}
    rest = {k: v for k, v in tensors.items() if k not in used}
    aliases = config.get("aliases") or {}
    if not isinstance(aliases, dict):
        raise ValueError(f"{path}: 'aliases' must be a map")
    try:
        missing, unexpected = model.load_state_dict(rest, strict=False)
    except RuntimeError as e:  # shape mismatches of dense tensors
        raise ValueError(f"{os.fspath(path)}: dense tensors do not fit the model: {e}") from e
    missing = [k for k in missing if k not in sparse_keys and k not in aliases]
    if strict and (missing or unexpected):
        raise ValueError(f"{os.fspath(path)} does not match the model: missing {missing[:10]}, unexpected {unexpected[:10]}")

    if any(m.backend_request == "auto" for m in new_modules.values()):
        autotune.note_plans(report, tune_model(model), new_modules)
    model.sparseprune_report = report
    return model


# --- save_pretrained(): a directory transformers and vLLM read -------------------------------------
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
# What tokenizers save_pretrained() write (fast and slow tokenizers, chat templates).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                   "chat_template.json")
_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _parse_size(size) -> int:
    if isinstance(size, int) and size > 0:
        return size
    text = str(size).strip().upper()
    for unit, mult in sorted(_SIZE_UNITS.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(unit) and text[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(text[: -len(unit)]) * mult)
    raise ValueError(f"max_shard_size must be a positive number of bytes or a string like '5GB', got {size!r}")


def save_pretrained(model: nn.Module, save_dir, *, tokenizer=None, max_shard_size="5GB") -> dict:
    """Writes a converted transformers model as a directory vLLM serves (``vllm serve save_dir``,
    through sparseprune's vLLM plugin) and :func:`load` reads back.

    - ``config.json``: the model's config plus ``quantization_config`` = {"quant_method":
      "sparseprune", ...the config :func:`save` writes: per-layer format, shape, dtype, block size}.
    - ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` shards of at most
      ``max_shard_size`` with ``model.safetensors.index.json``): the packed tensors of each
      SparseLinear (``<layer>.values``, ``.meta``, ``.crow``, ``.col``) and every other tensor dense,
      under the model's own names; tied tensors once (the others are listed as aliases).
    - ``generation_config.json`` when the model has one, and the tokenizer files: those of
      ``tokenizer`` when given, else those found in the directory the model was loaded from.

    Stale weight files of an earlier save into the same directory are removed first (vLLM reads
    every ``*.safetensors`` it finds). Returns the quantization_config.
    """
    from safetensors.torch import save_file

    hf_config = getattr(model, "config", None)
    if not hasattr(hf_config, "to_json_string"):
        raise TypeError(f"save_pretrained needs a transformers model (one with a .config), got {type(model).__name__}; "
                        f"sparseprune.save(model, file) saves any module")
    limit = _parse_size(max_shard_size)
    save_dir = os.fspath(save_dir)
    os.makedirs(save_dir, exist_ok=True)
    tensors, aliases = state_tensors(model)
    qconfig = {"quant_method": FORMAT_NAME, **build_config(model), "aliases": aliases}

    config = json.loads(hf_config.to_json_string(use_diff=True))
    config["quantization_config"] = qconfig
    config.setdefault("architectures", [type(model).__name__])
    if not config.get("dtype"):  # what dtype="auto" in vLLM and transformers resolves to
        floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
        if floats:
            config["dtype"] = _dtype_name(floats[0])

    for fname in os.listdir(save_dir):  # stale shards would be read alongside the new ones
        if fname == INDEX_NAME or (fname.startswith("model") and fname.endswith(".safetensors")):
            os.remove(os.path.join(save_dir, fname))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    names = [WEIGHTS_NAME] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, shard in zip(names, shards):
        save_file(shard, os.path.join(save_dir, fname), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {k: fname for fname, shard in zip(names, shards) for k in shard}}
        with open(os.path.join(save_dir, INDEX_NAME), "w") as f:
            json.dump(index, f, indent=2)
    with open(os.path.join(save_dir, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)

    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and hasattr(generation_config, "save_pretrained"):
        generation_config.save_pretrained(save_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(save_dir)
    else:
        source = getattr(model, "name_or_path", "") or ""
        if source and os.path.isdir(source) and os.path.abspath(source) != os.path.abspath(save_dir):
            for fname in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(source, fname)):
                    shutil.copyfile(os.path.join(source, fname), os.path.join(save_dir, fname))
    return qconfig


def read_tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, or of a directory's ``model.safetensors`` or the shards
    its ``model.safetensors.index.json`` lists."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return _read(path)[1]
    index = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: malformed safetensors index ({e})") from e
        tensors = {}
        for fname in files:
            if os.path.basename(fname) != fname:
                raise ValueError(f"{index}: shard name {fname!r} must be a plain file name")
            tensors.update(_read(os.path.join(path, fname))[1])
        return tensors
    return _read(os.path.join(path, WEIGHTS_NAME))[1]


def read_pretrained_config(path) -> dict:
    """The sparseprune quantization_config of a save_pretrained() directory (checked as load() does)."""
    cfg_file = os.path.join(os.fspath(path), CONFIG_NAME)
    if not os.path.isfile(cfg_file):
        raise ValueError(f"{os.fspath(path)}: no {CONFIG_NAME} (is it a save_pretrained() directory?)")
    try:
        with open(cfg_file) as f:
            hf = json.load(f)
    except ValueError as e:
        raise ValueError(f"{cfg_file}: not valid JSON: {e}") from e
    qconfig = hf.get("quantization_config") if isinstance(hf, dict) else None
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != FORMAT_NAME:
        raise ValueError(f"{cfg_file}: no quantization_config with quant_method={FORMAT_NAME!r} "
                         f"(was the directory written by sparseprune.save_pretrained?)")
    return check_config(qconfig, cfg_file)


def _read_pretrained(path) -> tuple[dict, dict[str, torch.Tensor]]:
    return read_pretrained_config(path), read_tensors(path)


def _model_from_config(path) -> nn.Module:
    """A dense model of the architecture and dtype in ``path``/config.json (random weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(os.fspath(path))
    dtype = _FLOAT_DTYPES.get(str(getattr(hf_config, "dtype", None) or "").replace("torch.", ""), torch.float32)
    return AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
