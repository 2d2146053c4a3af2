"""Input-channel permutation for N:4 and hybrid patterns (Pool & Yu, NeurIPS 2021).

2:4 keeps the best 2 of every 4 *consecutive* inputs. Reordering the inputs first (W[:, perm])
changes which weights compete, so a good order keeps more of the score under the same
constraint. The search here is bounded channel swapping between groups: each round pairs the
groups at random (disjoint pairs) and, for every pair, tries all 35 ways to split its 8 channels
into two groups of 4, keeping the best. The identity split is among the 35, so the kept score
never decreases, and disjoint pairs can all be updated at once (one vectorized step per round).

The pruned dense weight stays in the model's input order; the permutation is remembered on the
module (``_sparseprune_in_perm``) so that ``convert()`` packs ``W[:, perm]`` and either folds the
permutation into the layer that produces the input (:func:`fold_permutations`) or gathers x
inside the SparseLinear (``in_perm``).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from ..formats.conv import gemm_weight
from .patterns import Pattern
from .select import tied_parameter_names

PERM_ATTR = "_sparseprune_in_perm"

# Splits of 8 channels (two groups of 4) into two groups of 4, each split listed once: the
# first group always holds channel 0. Index 0 is the identity split (0,1,2,3 | 4,5,6,7).
_SPLITS_A = [c for c in itertools.combinations(range(8), 4) if c[0] == 0]
_SPLITS_B = [tuple(i for i in range(8) if i not in a) for a in _SPLITS_A]

# Bytes of scratch one vectorized step may use (rows x pairs x 35 splits x 8 floats).
_STEP_BYTES = 256 << 20


def check_permutable(pattern: Pattern) -> None:
    """Channel permutation is implemented for N:4 (e.g. 2:4) and hybrid (2:4 inside blocks)."""
    if pattern.kind == "nm" and pattern.m == 4:
        return
    if pattern.kind == "hybrid":
        return
    raise ValueError(f"permute=True works for N:4 patterns (e.g. '2:4') and 'hybrid', not '{pattern.name}'")


def _nm_of(pattern: Pattern) -> tuple[int, int]:
    return (pattern.n, pattern.m) if pattern.kind == "nm" else (2, 4)


def _top_n_of_4(a, b, c, d, n: int) -> torch.Tensor:
    """Sum of the n largest of four same-shape tensors, elementwise (no sort: max/min only)."""
    p, q = torch.maximum(a, b), torch.minimum(a, b)
    r, t = torch.maximum(c, d), torch.minimum(c, d)
    if n == 1:
        return torch.maximum(p, r)
    if n == 2:
        return torch.maximum(p, r) + torch.maximum(torch.minimum(p, r), torch.maximum(q, t))
    if n == 3:
        return a + b + c + d - torch.minimum(q, t)
    raise ValueError(f"N:4 needs 1 <= N <= 3, got {n}")


def kept_score(scores: torch.Tensor, n: int = 2, m: int = 4, perm: torch.Tensor | None = None) -> float:
    """Sum of the scores an N:M mask keeps when the inputs are taken in ``perm`` order."""
    s = scores.float() if perm is None else scores.float()[:, perm]
    rows, cols = s.shape
    return s.reshape(rows, cols // m, m).topk(n, dim=-1).values.double().sum().item()


def search_permutation(scores: torch.Tensor, n: int = 2, *, rounds: int = 40, patience: int = 3,
                       seed: int = 0, segment: int | None = None) -> torch.Tensor:
    """Input order ``perm`` (a permutation of range(in_features)) raising the N:4 kept score.

    ``scores`` [out, in] is what the mask should keep (|W| for magnitude, Wanda's |W|*||X||,
    OBS saliency for SparseGPT). Stops after ``rounds`` rounds, or after ``patience`` rounds in a
    row that gain less than 1e-6 of the total. Never returns an order worse than the identity.
    ``segment``: channels only move within their segment of that many inputs (hybrid: the block
    width, so every block keeps its set of columns and the block choice cannot change).
    Cost per round: about 35 x 2 x in x out elementwise operations (all vectorized).
    """
    s = scores.detach().float()
    rows, cols = s.shape
    if cols % 4:
        raise ValueError(f"in_features={cols} is not a multiple of 4")
    groups = cols // 4
    seg_groups = groups if segment is None else segment // 4
    if segment is not None and (segment % 4 or cols % segment):
        raise ValueError(f"segment={segment} must be a multiple of 4 dividing in_features={cols}")
    device = s.device
    identity = torch.arange(cols, device=device)
    if seg_groups < 2:
        return identity
    # split_a[k] / split_b[k]: the 4 positions (of the pair's 8 channels) forming each group
    split_a = torch.tensor(_SPLITS_A, device=device).t().contiguous()  # [4, 35]
    split_b = torch.tensor(_SPLITS_B, device=device).t().contiguous()
    gen = torch.Generator().manual_seed(seed)  # CPU generator: same order on every device
    perm = identity.clone()
    base = kept_score(s, n, 4)
    best_total, stale = base, 0
    st = s.t().contiguous()  # [cols, rows]: gathering channels reads contiguous rows
    per_pair = rows * len(_SPLITS_A) * 4 * 10  # ~10 live [rows, P, 35] fp32 temporaries
    chunk = max(1, _STEP_BYTES // per_pair)
    for _ in range(rounds):
        if seg_groups == groups:
            order = torch.randperm(groups, generator=gen)[None]
        else:  # a random order inside each segment
            nseg = groups // seg_groups
            order = torch.rand(nseg, seg_groups, generator=gen).argsort(dim=1) + \
                torch.arange(nseg)[:, None] * seg_groups
        pairs = order[:, : seg_groups // 2 * 2].reshape(-1, 2).to(device)  # disjoint pairs of groups
        g = perm.reshape(groups, 4)
        for start in range(0, pairs.shape[0], chunk):
            pr = pairs[start:start + chunk]
            chans = torch.cat([g[pr[:, 0]], g[pr[:, 1]]], dim=1)  # [P, 8] channel ids
            sc = st[chans]  # [P, 8, rows]
            ka = _top_n_of_4(*(sc[:, split_a[i]] for i in range(4)), n)  # [P, 35, rows]
            kb = _top_n_of_4(*(sc[:, split_b[i]] for i in range(4)), n)
            total = (ka + kb).sum(-1)  # [P, 35]
            best = total.argmax(dim=1)
            gain = total.gather(1, best[:, None]).squeeze(1) - total[:, 0]
            # Only move when the gain is above rounding noise of the fp32 sums.
            move = gain > 1e-6 * total[:, 0].abs().clamp_min(1e-30)
            pm, bm = pr[move], best[move]
            new = torch.cat([torch.gather(chans[move], 1, split_a.t()[bm]),
                             torch.gather(chans[move], 1, split_b.t()[bm])], dim=1)
            g[pm[:, 0]] = new[:, :4]
            g[pm[:, 1]] = new[:, 4:]
        perm = g.reshape(-1)
        now = kept_score(s, n, 4, perm)
        if now - best_total <= 1e-6 * abs(best_total):
            stale += 1
            if stale >= patience:
                break
        else:
            stale = 0
        best_total = max(best_total, now)
    if kept_score(s, n, 4, perm) < base:  # cannot happen by construction; keep the promise anyway
        return identity
    return perm


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))


def prune_layer_permuted(method, weight: torch.Tensor, pattern: Pattern, sparsity, *, stats=None,
                         block_keep=None, rounds: int = 40):
    """(mask, new weight, perm), mask and weight in the original input order.

    The method prunes W[:, perm] (with its statistics permuted to match), so the result is
    ``pattern``-shaped in permuted order: ``new_weight[:, perm]`` packs as it is.
    """
    check_permutable(pattern)
    if block_keep is not None:
        raise ValueError("permute=True cannot be combined with global_budget=True (the global block ranking "
                         "is made in the original input order)")
    n, _ = _nm_of(pattern)
    scores = method.scores(weight, stats)
    # hybrid: moving a channel to another block column would change which blocks exist (and
    # the blocks matter far more than the 2:4 inside them), so channels stay in their block column
    segment = pattern.block_size[1] if pattern.kind == "hybrid" else None
    perm = search_permutation(scores, n, rounds=rounds, segment=segment)
    pstats = None if stats is None else stats.permuted(perm)
    mask_p, w_p = method.prune_layer(weight[:, perm], pattern, sparsity, stats=pstats)
    inv = inverse_permutation(perm)
    return mask_p[:, inv], w_p[:, inv], perm


# --- remembering and applying the permutation --------------------------------------------------

def remember_permutation(module: nn.Module, perm: torch.Tensor | None) -> None:
    if perm is None:
        forget_permutation(module)
    else:
        setattr(module, PERM_ATTR, perm)


def forget_permutation(module: nn.Module) -> None:
    if hasattr(module, PERM_ATTR):
        delattr(module, PERM_ATTR)


def stored_permutation(module: nn.Module) -> torch.Tensor | None:
    perm = getattr(module, PERM_ATTR, None)
    if perm is not None and perm.numel() != module.weight.shape[1]:
        return None  # stale (the layer was resized)
    return perm


def weight_in_packing_order(module: nn.Module) -> torch.Tensor:
    """The weight with its inputs in the order it is packed in (W[:, perm] after permute=True)."""
    perm = stored_permutation(module)
    w = gemm_weight(module)  # a Conv2d's in the channels-last GEMM order
    return w if perm is None else w[:, perm.to(w.device)]


# Modules that act on each channel independently: a permutation of their input channels
# permutes their output channels the same way.
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Mish,
                nn.Softplus, nn.Hardswish, nn.Hardtanh, nn.Dropout, nn.Identity)
# MLPs computing down(act(gate(x)) * up(x)) (checked by class name: their forward is known).
_GATED_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP", "Gemma2MLP", "OlmoMLP", "Olmo2MLP",
               "GraniteMLP", "CohereMLP", "TinyLlamaMLP"}
# Transformer layers computing output.dense(act(intermediate.dense(x))).
_BERT_LAYERS = {"BertLayer", "RobertaLayer", "XLMRobertaLayer", "ElectraLayer", "CamembertLayer"}


def foldable_pairs(model: nn.Module) -> dict[str, list[str]]:
    """{consumer Linear: [producer Linears]} where permuting the producers' output rows permutes
    the consumer's inputs the same way, so the consumer needs no gather.

    Only patterns whose data flow is known: Linear -> elementwise modules -> Linear inside an
    nn.Sequential, the gated MLPs of Llama-like models (gate/up -> down), and BERT-like layers
    (intermediate.dense -> output.dense).
    """
    pairs: dict[str, list[str]] = {}
    for name, mod in model.named_modules():
        pre = f"{name}." if name else ""
        cls = type(mod).__name__
        if isinstance(mod, nn.Sequential):
            kids = list(mod.named_children())
            for i, (cn, child) in enumerate(kids):
                if not isinstance(child, nn.Linear):
                    continue
                j = i + 1
                while j < len(kids) and isinstance(kids[j][1], _ELEMENTWISE):
                    j += 1
                if j < len(kids) and isinstance(kids[j][1], nn.Linear):
                    pairs[pre + kids[j][0]] = [pre + cn]
        elif cls in _GATED_MLPS and all(isinstance(getattr(mod, a, None), nn.Linear)
                                        for a in ("gate_proj", "up_proj", "down_proj")):
            pairs[pre + "down_proj"] = [pre + "gate_proj", pre + "up_proj"]
        elif cls in _BERT_LAYERS:
            inter, out = getattr(mod, "intermediate", None), getattr(mod, "output", None)
            if isinstance(getattr(inter, "dense", None), nn.Linear) and isinstance(getattr(out, "dense", None), nn.Linear):
                pairs[pre + "output.dense"] = [pre + "intermediate.dense"]
    return pairs


def fold_permutations(model: nn.Module, results: dict, pairs: dict[str, list[str]] | None = None):
    """Decide, for every layer about to be packed, how its input permutation is applied.

    ``results`` is prune_model's {name: (plan, mask)}; masks are in the model's input order.
    Where the consumer's producers are known (:func:`foldable_pairs`, or the caller's ``pairs``)
    and row-permuting them keeps their own pattern (dense, or N:M, never block/hybrid), their
    output rows (weight, bias and mask) are permuted in place and the consumer gets no gather.

    Returns {name: (in_perm or None, note)}: ``in_perm`` for the SparseLinear (its weight is to
    be packed as ``W[:, in_perm]``), and a note for the report.
    """
    known = foldable_pairs(model) if pairs is None else dict(pairs)
    tied = tied_parameter_names(model)
    out = {}
    for name, (plan, _mask) in list(results.items()):
        perm = stored_permutation(plan.module)
        if perm is None:
            continue
        perm = perm.to(plan.module.weight.device)
        producers = known.get(name)
        ok = bool(producers)
        for pn in producers or []:
            try:
                pm = model.get_submodule(pn)
            except AttributeError:
                ok = False
                break
            ok = ok and isinstance(pm, nn.Linear) and pm.out_features == perm.numel() and f"{pn}.weight" not in tied
            if pn in results:
                ok = ok and results[pn][0].pattern.kind in ("nm", "unstructured")
        if not ok:
            out[name] = (perm, "inputs permuted (gather)")
            continue
        with torch.no_grad():
            for pn in producers:
                pm = model.get_submodule(pn)
                pm.weight.data = pm.weight.data[perm].contiguous()
                if pm.bias is not None:
                    pm.bias.data = pm.bias.data[perm].contiguous()
                if pn in results:
                    pplan, pmask = results[pn]
                    results[pn] = (pplan, pmask[perm])
        # The consumer's inputs now arrive permuted: its weight is stored permuted too.
        lin = plan.module
        lin.weight.data = lin.weight.data[:, perm].contiguous()
        results[name] = (plan, _mask[:, perm])
        forget_permutation(lin)
        out[name] = (None, f"inputs permuted (folded into {', '.join(producers)})")
    return out
