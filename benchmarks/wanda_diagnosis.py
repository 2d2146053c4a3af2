"""Why Wanda does not beat magnitude on the accuracy study's small Llama: where it wins and where it loses.

Two measurements on the study's LM (trained, or loaded from ``--cache``):

1. Per layer, the relative output error ||X W^T - X W'^T|| / ||X W^T|| on the calibration inputs
   of the dense model, for 2:4 masks chosen by magnitude and by Wanda (Wanda's score is the
   diagonal estimate of exactly this error, so it should be lower for every layer), and the
   fraction of mask entries the two choose alike.
2. Perplexity when only one kind of projection (q, k, v, o, gate, up, down; in every block) is
   pruned, by magnitude and by Wanda, at 2:4 and unstructured 50%: which layers turn a lower
   output error into a worse model.

    python benchmarks/wanda_diagnosis.py [--full] [--cache DIR]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import sparseprune  # noqa: E402
from sparseprune._device import device_name  # noqa: E402
from sparseprune.bench import accuracy  # noqa: E402
from sparseprune.prune.masks import make_mask  # noqa: E402
from sparseprune.prune.patterns import parse_pattern  # noqa: E402

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="the full study's LM (default: the quick one)")
    ap.add_argument("--cache", default="benchmarks/results/local")
    args = ap.parse_args(argv)
    os.makedirs(args.cache, exist_ok=True)
    dev = torch.device("cpu")
    task = accuracy.build_lm_task(not args.full, dev, cache_dir=args.cache, log=lambda *a: None)
    model = task.model
    print(f"device {device_name(dev)}, torch {torch.__version__}, LM {task.notes['params']:,} parameters "
          f"({'full' if args.full else 'quick'}), calibration {task.notes['calibration']}")

    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, []).append(
        a[0].detach().reshape(-1, a[0].shape[-1]).float()))
        for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    with torch.no_grad():
        for c in task.calibration:
            model(input_ids=c)
    for h in hooks:
        h.remove()

    nm = parse_pattern("2:4")
    print("\n1. relative output error of each layer at 2:4 (dense inputs)")
    print(f"{'layer':36s} {'magnitude':>9s} {'wanda':>7s}  {'input norm max/median':>21s} {'same mask':>9s}")
    wins = 0
    for name, xs in inputs.items():
        x = torch.cat(xs)
        w = model.get_submodule(name).weight.detach().float()
        norm = x.norm(dim=0)
        y = x @ w.t()
        err, masks = {}, {}
        for meth, score in (("magnitude", w.abs()), ("wanda", w.abs() * norm)):
            masks[meth] = make_mask(score, nm, None)
            err[meth] = ((x @ (w * masks[meth]).t() - y).norm() / y.norm()).item()
        same = (masks["magnitude"] == masks["wanda"]).float().mean().item()
        wins += err["wanda"] < err["magnitude"]
        q = norm.sort().values
        print(f"{name:36s} {err['magnitude']:9.4f} {err['wanda']:7.4f}  {(q[-1] / q[len(q) // 2]).item():21.1f} {same:9.3f}")
    print(f"wanda has the lower output error in {wins} of {len(inputs)} layers")

    print(f"\n2. perplexity with one kind of layer pruned (dense {task.evaluate(model):.4f})")
    print(f"{'pruned':12s} {'2:4 mag':>8s} {'2:4 wanda':>9s} {'50% mag':>8s} {'50% wanda':>9s}")
    for kind in KINDS:
        vals = []
        for pattern, kw in (("2:4", {}), ("unstructured", {"sparsity": 0.5})):
            for meth in ("magnitude", "wanda"):
                m = copy.deepcopy(model)
                sparseprune.prune(m, pattern, method=meth, include=f"model.layers.*.{kind}",
                                  calibration=task.calibration if meth == "wanda" else None, **kw)
                vals.append(task.evaluate(m))
        print(f"{kind:12s} {vals[0]:8.4f} {vals[1]:9.4f} {vals[2]:8.4f} {vals[3]:9.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
