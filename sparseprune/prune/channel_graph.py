"""Channel dependency groups: which channels structured pruning must remove together.

Removing output channel c of a layer is only possible together with input channel c of every
layer that reads it, and with channel c of everything on the way (a BatchNorm, a depthwise
conv) and of every other layer whose output is added or multiplied elementwise to it (a residual
add ties all its inputs; a gated MLP ties gate and up). Such a set is a :class:`Group`: its
``members`` are the layers involved, each with a role:

* ``"out"``: produces the channels (rows of the weight, dim 0, and the bias);
* ``"in"``: consumes them (dim 1 of the weight: Linear columns, Conv input channels);
* ``"follow"``: a per-channel module on the way (BatchNorm, LayerNorm/RMSNorm, depthwise conv):
  dim 0 of each of its per-channel tensors.

A group has ``units`` removable units and each member covers ``width`` consecutive indices per
unit: 1 for plain channels, ``head_dim`` for attention heads, ``H*W`` for a Linear reading a
flattened conv map, ``n_rep * head_dim`` for the query rows of one grouped-query KV group.

The groups are found in one of two ways:

* **torch.fx** (:func:`trace_groups`): the model is traced symbolically and channel spaces are
  propagated through the graph (union-find: elementwise binary ops unite the spaces of their
  operands). Anything the analysis does not understand (a reshape, a cat, an opaque module, a
  parameter used outside its module) pins the spaces it touches, so those layers are left
  alone and the reason is kept. If the model cannot be traced, its children are traced one by
  one (their inputs and outputs pinned), down to the layers themselves.
* **Known architectures** (:func:`rule_groups`): transformers' Llama-like and BERT-like blocks,
  recognised by class name, whose forward is known: gated-MLP intermediate neurons, attention
  heads (grouped-query attention: one unit is a KV head with its query heads, so the number of
  query heads per KV head stays the same). The residual stream (hidden size) is tied across the
  whole model by the embeddings, the norms and every residual add, so it is not pruned.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from .permute import _BERT_LAYERS, _ELEMENTWISE, _GATED_MLPS
from .select import tied_parameter_names

# Llama-like attention: q/k/v/o projections, heads of ``head_dim`` rows, query heads grouped per KV
# head (``num_key_value_groups``), forward reshaping with -1 heads. Qwen3 adds per-head q/k norms
# over head_dim, which removing whole heads leaves intact.
_LLAMA_ATTENTION = {"LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention"}


@dataclass
class Member:
    module: str
    role: str  # "out", "in" or "follow"
    width: int = 1  # indices per unit along the member's dimension


@dataclass
class Group:
    """Channels removed together. ``problem``: why the group cannot be pruned (None: it can);
    ``fatal``: the reason is a limit of the analysis, not a property of the model."""

    name: str
    units: int
    members: list[Member]
    kind: str = "channels"  # "channels", "mlp" (intermediate neurons) or "heads"
    exact: bool = True  # False where a norm re-normalises over the group's channels
    note: str = ""
    attrs: list[tuple[str, str, int]] = field(default_factory=list)  # (module, attribute, value per kept unit)
    config: dict[str, int] = field(default_factory=dict)  # transformers config key -> value per kept unit
    fixed_config: dict[str, int] = field(default_factory=dict)  # config keys to write as they are
    scales: dict[str, str] = field(default_factory=dict)  # producer -> the BatchNorm applied right after it
    problem: str | None = None
    fatal: bool = False

    def of_role(self, role: str) -> list[Member]:
        return [m for m in self.members if m.role == role]

    def layers(self) -> list[str]:
        """Names of the weighted layers (producers and consumers) of the group."""
        return [m.module for m in self.members if m.role in ("out", "in")]


@dataclass
class Analysis:
    groups: list[Group]
    left: dict[str, tuple[str, bool]]  # layer -> (why it is in no group, fatal)
    how: str  # "torch.fx" or "rules"


def is_layer(mod: nn.Module) -> bool:
    """Layers channel pruning reports on: Linear and (non-transposed) convolutions."""
    return isinstance(mod, nn.Linear) or (isinstance(mod, nn.modules.conv._ConvNd) and not mod.transposed)


# --- known architectures ----------------------------------------------------------------------------

def _linears(mod: nn.Module, *names: str) -> bool:
    for n in names:
        try:
            if not isinstance(mod.get_submodule(n), nn.Linear):
                return False
        except AttributeError:
            return False
    return True


def _gated_mlp_group(name: str, mod: nn.Module, cfg) -> Group:
    pre = f"{name}."
    inter = mod.gate_proj.out_features
    g = Group(name, inter, [Member(pre + "gate_proj", "out"), Member(pre + "up_proj", "out"),
                            Member(pre + "down_proj", "in")], kind="mlp", config={"intermediate_size": 1})
    if hasattr(mod, "intermediate_size"):
        g.attrs.append((name, "intermediate_size", 1))
    if mod.up_proj.out_features != inter or mod.down_proj.in_features != inter:
        g.problem, g.fatal = "gate_proj, up_proj and down_proj disagree on the intermediate size", True
    elif getattr(cfg, "pretraining_tp", 1) > 1:
        g.problem, g.fatal = f"pretraining_tp={cfg.pretraining_tp} slices the MLP by a fixed width", True
    return g


def _llama_attention_group(name: str, mod: nn.Module) -> Group:
    pre = f"{name}."
    hd = int(mod.head_dim)
    n_q, n_kv = mod.q_proj.out_features // hd, mod.k_proj.out_features // hd
    rep = n_q // max(n_kv, 1)
    g = Group(name, n_kv, [Member(pre + "q_proj", "out", rep * hd), Member(pre + "k_proj", "out", hd),
                           Member(pre + "v_proj", "out", hd), Member(pre + "o_proj", "in", rep * hd)],
              kind="heads", config={"num_attention_heads": rep, "num_key_value_heads": 1},
              fixed_config={"head_dim": hd},
              note=f"{n_q} query heads in {n_kv} KV groups of {rep}; a unit is one KV head with its query heads")
    # Older transformers read head counts (and the attention width as hidden_size) from the module.
    for attr, per in (("num_heads", rep), ("num_key_value_heads", 1), ("num_attention_heads", rep)):
        if isinstance(getattr(mod, attr, None), int):
            g.attrs.append((name, attr, per))
    if getattr(mod, "hidden_size", None) == n_q * hd:
        g.attrs.append((name, "hidden_size", rep * hd))
    if (n_q * hd != mod.q_proj.out_features or n_kv * hd != mod.k_proj.out_features or n_kv * rep != n_q
            or mod.v_proj.out_features != n_kv * hd or mod.o_proj.in_features != n_q * hd
            or getattr(mod, "num_key_value_groups", rep) != rep):
        g.problem, g.fatal = "the projections do not match head_dim and the KV grouping", True
    return g


def _bert_groups(name: str, mod: nn.Module) -> list[Group]:
    pre = f"{name}."
    out = []
    if _linears(mod, "intermediate.dense", "output.dense"):
        inter = mod.intermediate.dense.out_features
        g = Group(f"{pre}intermediate", inter, [Member(pre + "intermediate.dense", "out"),
                                                Member(pre + "output.dense", "in")],
                  kind="mlp", config={"intermediate_size": 1})
        if mod.output.dense.in_features != inter:
            g.problem, g.fatal = "intermediate.dense and output.dense disagree on the intermediate size", True
        out.append(g)
    att = getattr(mod, "attention", None)
    sa = getattr(att, "self", None)
    if att is not None and _linears(att, "self.query", "self.key", "self.value", "output.dense") \
            and isinstance(getattr(sa, "attention_head_size", None), int):
        hs = sa.attention_head_size
        heads = sa.query.out_features // hs
        a = f"{pre}attention."
        g = Group(f"{pre}attention", heads, [Member(a + "self.query", "out", hs), Member(a + "self.key", "out", hs),
                                             Member(a + "self.value", "out", hs),
                                             Member(a + "output.dense", "in", hs)], kind="heads",
                  note="BERT's config derives the head size from hidden_size / num_attention_heads, so the "
                       "per-layer head counts live in sparseprune's record, not in the config")
        for attr, per in (("num_attention_heads", 1), ("all_head_size", hs)):
            if isinstance(getattr(sa, attr, None), int):
                g.attrs.append((f"{a}self", attr, per))
        if heads * hs != sa.query.out_features or sa.key.out_features != heads * hs \
                or sa.value.out_features != heads * hs or att.output.dense.in_features != heads * hs:
            g.problem, g.fatal = "query/key/value/output do not match the head size", True
        if getattr(sa, "position_embedding_type", "absolute") != "absolute":
            g.problem, g.fatal = f"relative position embeddings ({sa.position_embedding_type}) are sized by heads", True
        out.append(g)
    return out


def rule_groups(model: nn.Module) -> Analysis | None:
    """Groups of the known transformers blocks in ``model``; None if it has none."""
    groups: list[Group] = []
    cfg = getattr(model, "config", None)
    for name, mod in model.named_modules():
        cls = type(mod).__name__
        if cls in _GATED_MLPS and _linears(mod, "gate_proj", "up_proj", "down_proj"):
            groups.append(_gated_mlp_group(name, mod, cfg))
        elif cls in _LLAMA_ATTENTION and _linears(mod, "q_proj", "k_proj", "v_proj", "o_proj") \
                and isinstance(getattr(mod, "head_dim", None), int):
            groups.append(_llama_attention_group(name, mod))
        elif cls in _BERT_LAYERS:
            groups += _bert_groups(name, mod)
    if not groups:
        return None
    covered = {m.module for g in groups for m in g.members}
    vocab = getattr(cfg, "vocab_size", None)
    left = {}
    for name, mod in model.named_modules():
        if is_layer(mod) and name not in covered:
            if isinstance(mod, nn.Linear) and vocab is not None and mod.out_features == vocab:
                left[name] = ("its outputs are the vocabulary logits (the model's outputs)", False)
            elif ".crossattention." in f".{name}.":
                left[name] = ("cross-attention is not handled by the channel rules", True)
            else:
                left[name] = ("outside the MLP and attention blocks: it reads or writes the residual stream "
                              "(hidden size), which the embeddings, norms and residual adds tie across the whole "
                              "model; hidden size is not pruned", False)
    return Analysis(groups, left, "rules")


# --- torch.fx ------------------------------------------------------------------------------------------

_PASS_MODULES = _ELEMENTWISE + (nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.SELU, nn.CELU, nn.Softsign,
                                nn.Hardsigmoid, nn.LogSigmoid, nn.Tanhshrink, nn.SiLU)
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_PASS_FUNCS = {F.relu, F.relu6, F.gelu, F.silu, F.elu, F.selu, F.leaky_relu, F.hardswish, F.hardtanh, F.mish,
               F.softplus, F.dropout, F.sigmoid, F.tanh, F.hardsigmoid, torch.relu, torch.sigmoid, torch.tanh,
               torch.neg, torch.abs, torch.exp, operator.neg}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone", "detach", "float",
                 "half", "bfloat16", "to", "type_as", "abs", "neg", "exp", "clamp", "clamp_min", "clamp_"}
_POOL_FUNCS = {F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
               F.adaptive_max_pool1d, F.adaptive_max_pool2d}
_BINARY = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul, operator.truediv,
           operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, "add", "add_", "sub", "sub_", "mul", "mul_",
           "div", "div_"}
_REDUCE = {torch.mean, torch.sum, torch.amax, torch.amin, "mean", "sum", "amax", "amin"}
_META = {"size", "dim", "numel", getattr, len}  # read shapes, not channel values

_NORMS = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


@dataclass(frozen=True)
class _Info:
    """What flows along a graph edge: channel space ``space`` in a known layout.

    ``layout``: "nchw" (channels at dim 1 of an ``ndim``-d map), "last" (channels in the last
    dim, rank unknown), "nc" (2-d: both), None (unknown: graph inputs and results of unknown ops,
    whose spaces are pinned). ``flat``: a conv map flattened to [N, C * rest] (channel-major).
    """

    space: int
    layout: str | None
    ndim: int | None = None
    flat: bool = False


class _Spaces:
    """Union-find of channel spaces, each with its members and the reasons it is pinned."""

    def __init__(self):
        self.parent: list[int] = []
        self.members: list[list[Member]] = []
        self.reasons: list[list[tuple[str, bool]]] = []
        self.scales: list[dict] = []
        self.inexact: list[list[str]] = []

    def new(self, reason: str | None = None, fatal: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.members.append([])
        self.reasons.append([])
        self.scales.append({})
        self.inexact.append([])
        s = len(self.parent) - 1
        if reason:
            self.pin(s, reason, fatal)
        return s

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        self.parent[b] = a
        for lst in (self.members, self.reasons, self.inexact):
            lst[a] += lst[b]
            lst[b] = []
        self.scales[a].update(self.scales[b])
        return a

    def pin(self, s: int, reason: str, fatal: bool) -> None:
        r = self.reasons[self.find(s)]
        if (reason, fatal) not in r:
            r.append((reason, fatal))

    def add(self, s: int, member: Member) -> None:
        self.members[self.find(s)].append(member)


class _Tracer(fx.Tracer):
    """torch.nn modules are leaves (as in fx's default); containers and user modules are traced through."""


def _flat_args(a):
    if isinstance(a, (tuple, list)):
        for x in a:
            yield from _flat_args(x)
    elif isinstance(a, dict):
        for x in a.values():
            yield from _flat_args(x)
    elif isinstance(a, slice):
        yield from _flat_args((a.start, a.stop, a.step))
    else:
        yield a


def _op_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return f"the method .{t}()"
    return f"{getattr(t, '__module__', '') or ''}.{getattr(t, '__name__', str(t))}".lstrip(".")


class _Analyzer:
    def __init__(self, model: nn.Module):
        self.model = model
        self.sp = _Spaces()
        self.producers: dict[str, nn.Module] = {}  # every layer seen producing channels
        self.functional: dict[str, str] = {}  # module -> how its parameters are used outside it
        self.seen: dict[str, int] = {}  # layer -> the space of its output channels

    # -- one traced region ---------------------------------------------------------------------
    def region(self, prefix: str, root: nn.Module, graph: fx.Graph, boundary: tuple[str, bool]) -> None:
        pre = f"{prefix}." if prefix else ""
        info: dict[fx.Node, _Info | None] = {}
        calls: dict[str, int] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        sp = self.sp

        def pin_inputs(node, why, fatal=True):
            for a in _flat_args((node.args, node.kwargs)):
                if isinstance(a, fx.Node) and info.get(a) is not None:
                    sp.pin(info[a].space, why, fatal)

        def unknown(node, why):
            pin_inputs(node, why)
            return _Info(sp.new(why, True), None)

        for node in graph.nodes:
            if node.op == "placeholder":
                info[node] = _Info(sp.new(*boundary_in(prefix, boundary)), None)
            elif node.op == "get_attr":
                owner = node.target.rpartition(".")[0]
                if owner:
                    self.functional.setdefault(pre + owner, f"its parameter {node.target} is used outside its forward")
                info[node] = None
            elif node.op == "output":
                why, fatal = boundary_out(prefix, boundary)
                pin_inputs(node, why, fatal)
            elif node.op == "call_module":
                info[node] = self._module(node, pre, root.get_submodule(node.target), info, calls, unknown)
            else:
                info[node] = self._function(node, info, unknown)

    def _module(self, node, pre, mod, info, calls, unknown):
        sp = self.sp
        name = pre + node.target
        x = node.args[0] if node.args else None
        xi = info.get(x) if isinstance(x, fx.Node) else None
        stateful = any(True for _ in mod.parameters(recurse=False)) or any(True for _ in mod.buffers(recurse=False))
        if calls[node.target] > 1 and stateful:
            return self._layer_unknown(node, name, mod, unknown, f"{name} is called more than once in forward")
        if any(isinstance(a, fx.Node) and info.get(a) is not None for a in _flat_args((node.args[1:], node.kwargs))):
            return self._layer_unknown(node, name, mod, unknown,
                                       f"{name} ({type(mod).__name__}) takes more than one input tensor")
        if isinstance(mod, nn.Linear):
            if xi is not None and xi.layout == "nchw":
                sp.pin(xi.space, f"{name} (Linear) is applied over the last dim of a conv feature map", True)
            elif xi is not None:
                sp.add(xi.space, Member(name, "in", 0 if xi.flat else 1))
            return self._produce(name, mod, "nc" if xi is not None and xi.layout == "nc" else "last")
        if is_layer(mod):  # convolution
            nd = 2 + len(mod.kernel_size)
            if xi is not None and xi.layout is not None and (xi.layout != "nchw" or xi.ndim != nd):
                sp.pin(xi.space, f"{name} ({type(mod).__name__}) reads a tensor whose channel dim is not known", True)
                xi = None
            groups, cin, cout = mod.groups, mod.in_channels, mod.out_channels
            if groups == 1:
                if xi is not None:
                    sp.add(xi.space, Member(name, "in"))
                return self._produce(name, mod, "nchw", nd)
            if groups == cin == cout and xi is not None:  # depthwise: channel c in -> channel c out
                sp.add(xi.space, Member(name, "follow"))
                self.seen[name] = xi.space
                return _Info(xi.space, "nchw", nd)
            why = (f"{name} is a grouped convolution (groups={groups}), which channel pruning does not handle"
                   if groups != cin or cin != cout else f"{name} is a depthwise convolution of a tensor whose "
                   f"channels are not known")
            if xi is not None:
                sp.pin(xi.space, why, True)
            out = self._produce(name, mod, "nchw", nd)
            sp.pin(out.space, why, True)
            return out
        if xi is None:
            return unknown(node, f"{name} ({type(mod).__name__}) reads a tensor whose channels are not known")
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            if xi.layout not in ("nchw", "nc") or xi.flat:
                return unknown(node, f"{name} ({type(mod).__name__}) normalises a dim that is not a channel dim")
            sp.add(xi.space, Member(name, "follow"))
            if isinstance(x, fx.Node) and x.op == "call_module" and pre + x.target in self.producers:
                sp.scales[sp.find(xi.space)][pre + x.target] = name
            return xi
        if isinstance(mod, _NORMS):
            shape = tuple(mod.normalized_shape)
            if len(shape) != 1 or xi.layout not in ("last", "nc") or xi.flat:
                return unknown(node, f"{name} ({type(mod).__name__}) normalises over more than the channel dim")
            sp.add(xi.space, Member(name, "follow"))
            sp.inexact[sp.find(xi.space)].append(name)
            return xi
        if isinstance(mod, _PASS_MODULES) and not stateful:
            return xi
        if isinstance(mod, _POOL_MODULES):
            if xi.layout != "nchw":
                return unknown(node, f"{name} ({type(mod).__name__}) pools a tensor that is not a conv map")
            return xi
        if isinstance(mod, nn.Flatten):
            return self._flatten(node, xi, mod.start_dim, mod.end_dim, unknown)
        return unknown(node, f"{name} ({type(mod).__name__}) is a module the channel analysis does not know")

    def _produce(self, name: str, mod: nn.Module, layout: str, ndim: int | None = None) -> _Info:
        s = self.sp.new()
        self.sp.add(s, Member(name, "out"))
        self.producers[name] = mod
        self.seen[name] = s
        return _Info(s, layout, ndim)

    def _layer_unknown(self, node, name, mod, unknown, why):
        out = unknown(node, why)
        if is_layer(mod):
            self.seen[name] = out.space
        return out

    def _flatten(self, node, xi, start, end, unknown):
        if xi.layout == "nc" and start in (1, -1) and end in (-1, 1):
            return xi
        if xi.layout == "nchw" and start == 1 and (end == -1 or end == xi.ndim - 1):
            return _Info(xi.space, "nc", 2, True)
        return unknown(node, f"{_op_name(node)} flattens the channel dim with others in an unknown order")

    def _function(self, node, info, unknown):
        sp = self.sp
        t = node.target
        key = t  # a function, or a method's name
        tensors = [a for a in _flat_args((node.args, node.kwargs)) if isinstance(a, fx.Node)]
        known = [info[a] for a in tensors if info.get(a) is not None]
        if key in _META or not known:
            return None  # reads shapes, or computes on constants only
        x = node.args[0] if node.args else None
        xi = info.get(x) if isinstance(x, fx.Node) else None
        if key in _BINARY:
            others = [a for a in tensors if info.get(a) is None]
            if others:
                return unknown(node, f"{_op_name(node)} combines channels with a tensor of unknown shape "
                                     f"({others[0].name})")
            first = known[0]
            if any(k.layout != first.layout or k.flat != first.flat or k.ndim != first.ndim for k in known[1:]):
                return unknown(node, f"{_op_name(node)} combines tensors of different layouts")
            s = first.space
            for k in known[1:]:
                s = sp.union(s, k.space)
            return _Info(s, first.layout, first.ndim, first.flat)
        if xi is None or len(known) != 1:
            return unknown(node, f"{_op_name(node)} mixes several tensors in a way the analysis does not know")
        if key in _PASS_FUNCS or (node.op == "call_method" and t in _PASS_METHODS):
            return xi
        if key in _POOL_FUNCS:
            return xi if xi.layout == "nchw" else unknown(node, f"{_op_name(node)} pools a tensor that is not a conv map")
        if key in ("view", "reshape", torch.reshape) and xi.layout == "nchw" and _is_batch_flatten(node, x):
            return _Info(xi.space, "nc", 2, True)  # x.view(x.size(0), -1): flatten(x, 1)
        if key in (torch.flatten, "flatten"):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self._flatten(node, xi, start, end, unknown)
        if key in _REDUCE and xi.layout == "nchw" and xi.ndim:
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
            dims = (dims,) if isinstance(dims, int) else dims
            if isinstance(dims, (tuple, list)) and all(isinstance(d, int) for d in dims):
                dims = {d % xi.ndim for d in dims}
                if 0 not in dims and 1 not in dims:
                    nd = xi.ndim if keep else xi.ndim - len(dims)
                    return _Info(xi.space, "nchw" if nd > 2 else "nc", nd)
        return unknown(node, f"{_op_name(node)} is applied to channels in a way the analysis does not know")

    # -- result ----------------------------------------------------------------------------------
    def groups(self) -> list[Group]:
        sp = self.sp
        order = {n: i for i, (n, _) in enumerate(self.model.named_modules())}
        tied = tied_parameter_names(self.model)
        out = []
        for s in range(len(sp.parent)):
            if sp.find(s) != s:
                continue
            members = sp.members[s]
            prods = [m for m in members if m.role == "out"]
            if not prods:
                continue
            prods.sort(key=lambda m: order.get(m.module, 0))
            mods = {m.module: self.model.get_submodule(m.module) for m in members}
            sizes = {m.module: (mods[m.module].out_features if isinstance(mods[m.module], nn.Linear)
                                else mods[m.module].out_channels) for m in prods}
            units = sizes[prods[0].module]
            g = Group(prods[0].module, units, sorted(members, key=lambda m: (order.get(m.module, 0), m.role)),
                      scales=dict(sp.scales[s]))
            reasons = list(sp.reasons[s])
            if len(set(sizes.values())) > 1:
                reasons.append((f"its producers disagree on the number of channels: {sizes}", True))
            for m in g.members:
                mod = mods[m.module]
                if m.role == "in" and isinstance(mod, nn.Linear):
                    if m.width == 0:  # reads a flattened conv map: in_features = channels * positions
                        m.width = mod.in_features // units if mod.in_features % units == 0 else -1
                    if m.width * units != mod.in_features:
                        reasons.append((f"{m.module} reads {mod.in_features} features, not a multiple of the "
                                        f"{units} channels", True))
                elif m.role == "in" and mod.in_channels != units:
                    reasons.append((f"{m.module} reads {mod.in_channels} channels, the producers make {units}", True))
                elif m.role == "follow":
                    n = (mod.num_features if isinstance(mod, nn.modules.batchnorm._BatchNorm) else
                         mod.out_channels if is_layer(mod) else mod.normalized_shape[0])
                    if n != units:
                        reasons.append((f"{m.module} has {n} channels, the producers make {units}", True))
                if m.module in self.functional:
                    reasons.append((f"{m.module}: {self.functional[m.module]}", True))
                if any(f"{m.module}.{p}" in tied for p, _ in mod.named_parameters(recurse=False)):
                    reasons.append((f"{m.module} shares a parameter with another module (tied weights)", True))
            if reasons:
                g.problem = "; ".join(dict.fromkeys(r for r, _ in reasons))
                g.fatal = any(f for _, f in reasons)
            if sp.inexact[s]:
                g.exact = False
                g.note = (f"{', '.join(sp.inexact[s])} re-normalise over the kept channels, so the result is not "
                          f"the masked model's")
            out.append(g)
        out.sort(key=lambda g: order.get(g.name, 0))
        return out


def _is_batch_size(n, x: fx.Node) -> bool:
    """Whether ``n`` computes x.size(0) or x.shape[0]."""
    if not isinstance(n, fx.Node):
        return False
    if n.op == "call_method" and n.target == "size" and n.args[:1] == (x,) and tuple(n.args[1:]) == (0,):
        return True
    if n.op == "call_function" and n.target is operator.getitem and n.args[1:] == (0,):
        src = n.args[0]
        return (isinstance(src, fx.Node) and src.op == "call_function" and src.target is getattr
                and src.args == (x, "shape")) or (isinstance(src, fx.Node) and src.op == "call_method"
                                                  and src.target == "size" and src.args == (x,))
    return False


def _is_batch_flatten(node: fx.Node, x: fx.Node) -> bool:
    """x.view(x.size(0), -1) / x.reshape(x.shape[0], -1) / torch.reshape(x, (x.size(0), -1))."""
    shape = node.args[1:] if node.op == "call_method" else node.args[1:2]
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return len(shape) == 2 and shape[1] == -1 and _is_batch_size(shape[0], x)


def boundary_in(prefix: str, boundary: tuple[str, bool]) -> tuple[str, bool]:
    return ("an input of the model", False) if not prefix else (f"an input of {prefix}, {boundary[0]}", True)


def boundary_out(prefix: str, boundary: tuple[str, bool]) -> tuple[str, bool]:
    return ("an output of the model", False) if not prefix else (f"an output of {prefix}, {boundary[0]}", True)


def _trace_error(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg[:160]}"


def trace_groups(model: nn.Module) -> Analysis:
    """Groups found by tracing ``model`` (or, where that fails, its children) with torch.fx."""
    an = _Analyzer(model)
    left: dict[str, tuple[str, bool]] = {}

    def visit(prefix: str, mod: nn.Module, why: str) -> None:
        if not any(is_layer(m) for m in mod.modules()):
            return
        if is_layer(mod):
            left[prefix] = (why, True)
            return
        try:
            graph = _Tracer().trace(mod)
        except Exception as e:  # noqa: BLE001 - any tracing failure means: analyse the children
            err = f"{prefix or 'the model'} cannot be traced by torch.fx ({_trace_error(e)})"
            for cname, child in mod.named_children():
                visit(f"{prefix}.{cname}" if prefix else cname, child, f"analysed on its own because {err}")
            return
        an.region(prefix, mod, graph, (why, True))

    visit("", model, "")
    groups = an.groups()
    in_group = {m.module for g in groups for m in g.members if m.role in ("out", "follow")}
    for name, mod in model.named_modules():
        if not is_layer(mod) or name in in_group or name in left:
            continue
        if name in an.seen:
            reasons = an.sp.reasons[an.sp.find(an.seen[name])]
            left[name] = ("; ".join(dict.fromkeys(r for r, _ in reasons)) or "its channels have no producer",
                          any(f for _, f in reasons))
        else:
            left[name] = ("not called as a module in the traced forward (inside a module the analysis treats "
                          "as opaque, or used functionally)", True)
    return Analysis(groups, left, "torch.fx")


def find_groups(model: nn.Module) -> Analysis:
    """Known-architecture rules where the model has such blocks, else torch.fx tracing."""
    return rule_groups(model) or trace_groups(model)
