"""vLLM offline throughput: dense vs 2:4 vs block 90% vs hybrid, served through the sparseprune plugin.

A Llama-shaped model with random weights (hidden 2048 and 4 layers by default, a small vocabulary so
the linear layers dominate) is saved dense (transformers save_pretrained) and converted + exported
(sparseprune.save_pretrained) as 2:4, block 32x32 at 90% and hybrid 32x32 at 87.5% (75% of the
blocks, 2:4 inside). One vLLM engine per variant runs in its own process (in-process engine core,
CPU threads bound to the cores given); the orchestrator times them in turn, round after round, and
reports per variant the median output tokens/s at batch 1 and at a batch of concurrent requests
(greedy, fixed output length, random prompt ids), and the median over rounds of variant/dense.

    python benchmarks/bench_vllm.py [--hidden 2048] [--layers 4] [--dtype fp32] [--batch 16]
                                    [--rounds 5] [--eager] [--profile] [--out benchmarks/results/local]

``--profile`` adds, per variant, where one batch-1 generation spends its time (torch.profiler):
our sparse ops, dense GEMMs, attention, and everything else (vLLM's scheduling, sampling, Python).
Writes ``vllm.md`` (overwritten), appends rows to ``vllm.csv`` and writes ``vllm.json``, by default in
``benchmarks/results/<machine label>/``, every row with the machine's metadata (sparseprune.bench.machine:
CPU model, family/model, ISA level, cores, load before/after, versions, date). Built models are cached
under ``build/bench-cache/vllm-models`` (``--cache``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

VARIANTS = {  # name: (convert pattern or None for dense, convert kwargs)
    "dense": (None, {}),
    "2:4": ("2:4", {}),
    "block 90%": ("block", {"sparsity": 0.9, "block_size": (32, 32)}),
    "hybrid 87.5%": ("hybrid", {"sparsity": 0.75, "block_size": (32, 32)}),
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


# --- models ---------------------------------------------------------------------------------------
def build(args, variant: str, path: str) -> None:
    """Writes ``variant`` of the benchmark model to ``path`` (random weights, seed 0)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import sparseprune

    torch.manual_seed(0)
    heads = args.hidden // 128
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=args.vocab,
                      max_position_embeddings=4096)
    model = LlamaForCausalLM(cfg).to(getattr(torch, DTYPES[args.dtype])).eval()
    pattern, kw = VARIANTS[variant]
    if pattern is None:
        model.save_pretrained(path)
        return
    # backend="cpu": the C++ kernels in every bucket (no autotuning, no dense fallback), so the
    # figures are those of our kernels; --backend auto measures what a default conversion serves.
    sparseprune.convert(model, pattern, exclude=["lm_head"], backend=args.backend, progress=False, **kw)
    sparseprune.save_pretrained(model, path)


# --- one engine per process -------------------------------------------------------------------------
def serve(args) -> None:
    """Worker: one engine on ``args.serve``; answers commands on stdin with one JSON line each."""
    import torch
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.serve, skip_tokenizer_init=True, dtype=DTYPES[args.dtype], enforce_eager=args.eager,
              max_model_len=args.prompt + args.tokens + 8, max_num_seqs=max(args.batch, 1), seed=0,
              distributed_executor_backend="uni", kv_cache_memory_bytes=args.kv_mib << 20)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, args.vocab, (args.prompt,), generator=gen).tolist() for _ in range(args.batch)]
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)

    def run(n):
        c0, t0 = time.process_time(), time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:n]], params, use_tqdm=False)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        # cpu_s: CPU time of this process, all threads. On a shared machine wall time also counts
        # the time other processes held our cores; CPU time does not (waiting OMP threads spin, so
        # with several threads it overstates the work; with one it is the work).
        return {"tokens": sum(len(o.outputs[0].token_ids) for o in outs), "s": dt, "cpu_s": cpu,
                "first": list(outs[0].outputs[0].token_ids[:8])}

    print(json.dumps({"ready": True, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        if cmd.startswith("run "):
            print(json.dumps(run(int(cmd.split()[1]))), flush=True)
        elif cmd == "profile":
            print(json.dumps(profile(run)), flush=True)
    llm.llm_engine.engine_core.shutdown()


# Op names by where the time goes (self CPU time of the profiler's events).
GROUPS = [
    ("sparse kernels", re.compile(r"^sparseprune::")),
    ("dense GEMM", re.compile(r"onednn|mkldnn|aten::(mm|addmm|linear|matmul|bmm)$|_C::.*gemm|cpu_gemm", re.I)),
    ("attention", re.compile(r"attn|attention|paged|kv_cache|reshape_and_cache|sdpa", re.I)),
]


def profile(run) -> dict:
    """ms per output token of one batch-1 generation, by group of ops, and the total."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        res = run(1)
    per_group = {name: 0.0 for name, _ in GROUPS}
    ops = 0.0
    for evt in prof.key_averages():
        self_ms = evt.self_cpu_time_total / 1e3
        ops += self_ms
        for name, pat in GROUPS:
            if pat.search(evt.key):
                per_group[name] += self_ms
                break
    total_ms = res["s"] * 1e3
    out = {k: v / res["tokens"] for k, v in per_group.items()}
    out["other ops"] = (ops - sum(per_group.values())) / res["tokens"]
    out["total"] = total_ms / res["tokens"]
    out["outside ops (Python, scheduling)"] = max(0.0, total_ms - ops) / res["tokens"]
    return out


class Worker:
    def __init__(self, args, variant, path):
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_OMP_THREADS_BIND=args.cpus,
                   OMP_NUM_THREADS=str(len(_cpu_list(args.cpus))))
        cmd = [sys.executable, __file__, "--serve", path] + _forward(args)
        self.variant = variant
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
                                     stderr=None if args.verbose else subprocess.DEVNULL)
        self.info = self._read()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"the {self.variant} engine exited (rc={self.proc.wait()}); rerun with --verbose")

    def ask(self, cmd):
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def _cpu_list(spec: str) -> list[int]:
    out = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


def _forward(args) -> list[str]:
    return ["--dtype", args.dtype, "--batch", str(args.batch), "--tokens", str(args.tokens), "--prompt",
            str(args.prompt), "--vocab", str(args.vocab), "--kv-mib", str(args.kv_mib)] + (["--eager"] if args.eager else [])


# --- orchestration ------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=None, help="default 2.75 x hidden (Llama's ratio)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--backend", default="cpu", help="sparseprune backend recorded at conversion (default cpu)")
    ap.add_argument("--batch", type=int, default=16, help="concurrent requests of the batched measurement")
    ap.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per request")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    ap.add_argument("--cpus", default=None, help="cores the engines' threads are bound to (default: all allowed)")
    ap.add_argument("--kv-mib", type=int, default=256, help="KV cache per engine")
    ap.add_argument("--eager", action="store_true", help="no torch.compile in vLLM (faster start)")
    ap.add_argument("--profile", action="store_true", help="also break one batch-1 generation down by op group")
    ap.add_argument("--verbose", action="store_true", help="show the engines' logs")
    ap.add_argument("--out", default=None, help="default benchmarks/results/<machine label>")
    ap.add_argument("--cache", default=os.path.join(os.path.dirname(__file__), "..", "build", "bench-cache"),
                    help="where the built models are kept")
    ap.add_argument("--serve", default=None, help=argparse.SUPPRESS)  # internal: run as an engine worker
    ap.add_argument("--build", default=None, help=argparse.SUPPRESS)  # internal: write one variant ...
    ap.add_argument("--to", default=None, help=argparse.SUPPRESS)  # ... to this directory
    args = ap.parse_args(argv)
    if args.serve:
        return serve(args)
    if args.build:
        return build(args, args.build, args.to)
    args.intermediate = args.intermediate or int(args.hidden * 2.75) // 256 * 256
    args.cpus = args.cpus or ",".join(map(str, sorted(os.sched_getaffinity(0))))
    variants = [v.strip() for v in args.variants.split(",")]
    if "dense" not in variants:
        variants.insert(0, "dense")

    from sparseprune.bench import machine

    meta = machine.run_metadata("cpu", dtype=args.dtype, weights="cold")  # load average as the run starts
    args.out = args.out or machine.default_results_dir("cpu")
    shape = f"h{args.hidden}-i{args.intermediate}-l{args.layers}-v{args.vocab}-{args.dtype}-{args.backend}"
    os.makedirs(args.out, exist_ok=True)
    paths = {}
    for v in variants:
        paths[v] = os.path.join(args.cache, "vllm-models", shape, re.sub(r"[^a-z0-9]+", "-", v.lower()).strip("-"))
        if not os.path.isfile(os.path.join(paths[v], "config.json")):
            print(f"building {v} ({shape}) ...", flush=True)
            t0 = time.time()
            # a subprocess, so the orchestrator never holds the models
            subprocess.run([sys.executable, __file__, "--build", v, "--to", paths[v], "--hidden", str(args.hidden),
                            "--intermediate", str(args.intermediate), "--layers", str(args.layers), "--vocab",
                            str(args.vocab), "--dtype", args.dtype, "--backend", args.backend], check=True)
            print(f"  built in {time.time() - t0:.0f} s", flush=True)

    workers = {}
    try:
        for v in variants:
            t0 = time.time()
            workers[v] = Worker(args, v, paths[v])
            print(f"engine {v}: ready in {time.time() - t0:.0f} s ({workers[v].info['threads']} threads)", flush=True)
        for w in workers.values():  # warm-up (first-call allocations, vLLM's lazy init)
            w.ask("run 1")
            w.ask(f"run {args.batch}")
        tps = {(v, b): [] for v in variants for b in (1, args.batch)}
        cpu_tps = {(v, b): [] for v in variants for b in (1, args.batch)}
        for r in range(args.rounds):
            for b in (1, args.batch):
                for v, w in workers.items():
                    res = w.ask(f"run {b}")
                    tps[(v, b)].append(res["tokens"] / res["s"])
                    cpu_tps[(v, b)].append(res["tokens"] / res["cpu_s"])
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{v} {tps[(v, 1)][-1]:.1f}/{tps[(v, args.batch)][-1]:.1f} tok/s" for v in variants), flush=True)
        prof = {v: w.ask("profile") for v, w in workers.items()} if args.profile else {}
    finally:
        for w in workers.values():
            w.close()

    import torch
    import vllm

    import sparseprune
    from sparseprune.bench.speed import write_csv

    meta = machine.finish(meta)
    load = meta["loadavg_after"]
    rows = []
    for v in variants:
        for b in (1, args.batch):
            ratio = statistics.median(s / d for s, d in zip(tps[(v, b)], tps[("dense", b)]))
            cpu_ratio = statistics.median(s / d for s, d in zip(cpu_tps[(v, b)], cpu_tps[("dense", b)]))
            rows.append({**meta, "engine_cpus": args.cpus, "vllm": vllm.__version__, "model": shape,
                         "eager": args.eager, "variant": v, "batch": b, "tokens_per_s": f"{statistics.median(tps[(v, b)]):.2f}",
                         "vs_dense": f"{ratio:.2f}", "tokens_per_cpu_s": f"{statistics.median(cpu_tps[(v, b)]):.2f}",
                         "vs_dense_cpu_time": f"{cpu_ratio:.2f}", "rounds": args.rounds})
    csv_path = os.path.join(args.out, "vllm.csv")
    write_csv(rows, csv_path)
    machine.write_metadata(os.path.join(args.out, "vllm.json"), meta, vllm=vllm.__version__, model=shape,
                           rounds=args.rounds, batch=args.batch, eager=args.eager)
    date = meta["date"]
    lines = [f"# vLLM offline throughput, {machine.describe(meta)}", "",
             f"{date}; model {shape} (random weights); cores {args.cpus}; load average {meta['loadavg_before']} -> {load}; torch "
             f"{torch.__version__}, vLLM {vllm.__version__}, sparseprune {sparseprune.__version__}; "
             f"{'eager' if args.eager else 'torch.compile'}; {args.prompt} prompt + {args.tokens} output tokens per "
             f"request; medians of {args.rounds} interleaved rounds. 'By CPU time': tokens per CPU-second of "
             f"the engine process (robust to other load when the engine has one core).", "",
             f"| variant | tok/s b=1 | vs dense | tok/s b={args.batch} | vs dense | by CPU time: b=1 | b={args.batch} |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for v in variants:
        r1, rb = [r for r in rows if r["variant"] == v]
        lines.append(f"| {v} | {r1['tokens_per_s']} | {r1['vs_dense']}x | {rb['tokens_per_s']} | {rb['vs_dense']}x "
                     f"| {r1['vs_dense_cpu_time']}x | {rb['vs_dense_cpu_time']}x |")
    if prof:
        groups = list(next(iter(prof.values())))
        lines += ["", "Batch 1, ms per output token (torch.profiler, self CPU time):", "",
                  "| variant | " + " | ".join(groups) + " |", "| --- |" + " --- |" * len(groups)]
        for v, p in prof.items():
            lines.append(f"| {v} | " + " | ".join(f"{p[g]:.2f}" for g in groups) + " |")
    md_path = os.path.join(args.out, "vllm.md")
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {md_path} and {csv_path}")


if __name__ == "__main__":
    main()
