"""`sparseprune bench` and the benchmark scripts: metadata, hot and cold weights, honest rows.

Small shapes and tiny timing budgets: these check what the benchmark records and refuses, not speed.
"""

from __future__ import annotations

import csv
import datetime
import importlib.util
import json
import math
import os
import pathlib
import shutil
import subprocess
import time

import pytest
import torch

import sparseprune
from sparseprune.__main__ import main as cli
from sparseprune.bench import machine, speed
from sparseprune.bench.timing import Rotation, cold_copies

ROOT = pathlib.Path(__file__).parents[1]
# What every results file must say about the run (the list), as CSV columns.
REQUIRED = ["date", "label", "cpu_model", "cpu_family", "cpu_model_id", "isa", "cores", "cpus", "threads",
            "loadavg_before", "loadavg_after", "torch", "sparseprune", "dtype", "weights"]


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _proc_cpuinfo_field(name: str) -> str:
    """Read here independently of the library (first processor block)."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.split(":")[0].strip() == name:
                return line.split(":", 1)[1].strip()
    raise AssertionError(f"/proc/cpuinfo has no {name}")


def _check_metadata(row: dict) -> None:
    missing = [k for k in REQUIRED if k not in row]
    assert not missing, f"missing metadata columns {missing}"
    assert row["cpu_model"] == _proc_cpuinfo_field("model name")
    assert row["cpu_family"] == _proc_cpuinfo_field("cpu family")
    assert row["cpu_model_id"] == _proc_cpuinfo_field("model")
    assert row["isa"] == sparseprune.build_info()["cpu_isa_active"]
    assert int(row["cpus"]) == len(os.sched_getaffinity(0)) and int(row["cores"]) >= 1
    assert int(row["threads"]) == torch.get_num_threads()
    assert float(row["loadavg_before"]) >= 0 and float(row["loadavg_after"]) >= 0
    assert row["torch"] == torch.__version__ and row["sparseprune"] == sparseprune.__version__
    assert row["label"] == machine.cpu_label()
    datetime.datetime.fromisoformat(row["date"])


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    rows = speed.run(str(out), dtype="fp32", shapes=["512x1024"], batches=[1, 3], cold_batches=[1],
                     cases=["2:4", "block32 90%", "torch-bsr32 90%"], auto_cases=["2:4"], budget_s=0.002,
                     progress=False)
    return out, rows


def test_run_writes_every_metadata_column_hot_and_cold(fp32_run):
    out, rows = fp32_run
    written = _rows(out / "speed-fp32.csv")
    assert len(written) == len(rows) > 0
    for r in written:
        _check_metadata(r)
    assert {r["weights"] for r in written} == {"hot", "cold"}
    assert {r["dtype"] for r in written} == {"fp32"}
    # hot at batches 1 and 3, cold at 1 only; every (pattern, row) has both
    by = {}
    for r in written:
        by.setdefault((r["pattern"], r["backend"]), set()).add((r["weights"], int(r["batch"])))
    assert by and all(v == {("hot", 1), ("hot", 3), ("cold", 1)} for v in by.values()), by
    meta = json.loads((out / "speed-fp32.json").read_text())
    assert all(k in meta for k in REQUIRED if k != "weights") and meta["grid"]["weights"] == ["hot", "cold"]
    assert meta["cpu_model"] == _proc_cpuinfo_field("model name") and meta["loadavg_after"] is not None
    text = (out / "speed-fp32.txt").read_text()
    assert "HOT weights" in text and "COLD weights" in text and _proc_cpuinfo_field("model name") in text


def test_ours_rows_name_their_backend_and_auto_is_its_own_row(fp32_run):
    _, rows = fp32_run
    r24 = [r for r in rows if r["pattern"] == "2:4"]
    assert {(r["impl"], r["backend"]) for r in r24} == {("ours", "cpu"), ("auto", "auto")}
    assert all(r["backend_used"] == "cpu" for r in r24 if r["impl"] == "ours")
    assert all(r["backend_used"] in ("cpu", "dense") for r in r24 if r["impl"] == "auto")
    # auto rows only where asked; never an "auto" backend under our name
    assert not [r for r in rows if r["pattern"] != "2:4" and r["impl"] == "auto"]
    assert all(r["backend"] != "auto" for r in rows if r["impl"] == "ours")
    assert {r["impl"] for r in rows if r["pattern"] == "torch-bsr32 90%"} == {"torch-bsr"}
    table = speed.format_table(rows)
    assert "ours[cpu]" in table and " auto " in table


def test_cold_rows_stream_more_than_the_llc_read(fp32_run):
    _, rows = fp32_run
    llc, _ = machine.llc_bytes()
    cold = [r for r in rows if r["weights"] == "cold"]
    assert cold and all(r["llc_bytes"] == llc for r in cold)
    for r in cold:
        assert r["copies"] >= 2 and r["rotation_mb"] * 2**20 > llc, r
    hot = [r for r in rows if r["weights"] == "hot"]
    assert all(r["copies"] == 1 for r in hot)
    # dense and sparse rotate through the same number of copies within a case
    for pattern in {r["pattern"] for r in cold}:
        assert len({r["copies"] for r in cold if r["pattern"] == pattern}) == 1


def test_cold_rotation_uses_distinct_copies_whose_total_exceeds_the_llc():
    llc, source = machine.llc_bytes()
    assert llc > 0 and source
    case = speed.resolve_cases(["2:4"])[0]
    with torch.inference_mode():
        w = torch.randn(512, 1024)
        dense = [w]
        prep = speed.prepare_case(case, "512x1024", w, dense, ["cpu"], True, cold=True, llc_bytes=llc)
        n = prep.copies
        assert n >= 2 and len(dense) == n and all(len(v.copies) == n for v in prep.variants)
        ptrs = [t.data_ptr() for t in dense]
        for v in prep.variants:
            for mod in v.copies:
                ptrs += [b.data_ptr() for b in mod.buffers()]
        assert len(set(ptrs)) == len(ptrs), "cold copies share storage"
        total = sum(t.nbytes for t in dense) + sum(b.nbytes for v in prep.variants for m in v.copies
                                                   for b in m.buffers())
        assert total == n * prep.round_bytes > llc
        # every copy computes the same layer
        x = torch.randn(3, 1024)
        want = torch.nn.functional.linear(x, prep.wm)
        for v in prep.variants:
            for i in range(n):
                torch.testing.assert_close(v.output(i, x, x.t().contiguous()), want, rtol=1e-4, atol=1e-4)


def test_rotation_calls_each_copy_in_turn():
    seen = []
    rot = Rotation([lambda i=i: seen.append(i) for i in range(3)])
    for _ in range(7):
        rot()
    assert seen == [0, 1, 2, 0, 1, 2, 0] and len(rot) == 3
    with pytest.raises(ValueError):
        Rotation([])


def test_compare_self_timed_uses_the_seconds_each_call_returns():
    from sparseprune.bench.timing import compare

    calls = []
    r = compare(lambda: calls.append("d") or 0.02, {"a": lambda: calls.append("a") or 0.01}, "cpu", budget_s=0.05,
                min_rounds=5, warmup=1, self_timed=True)["a"]
    assert r["speedup"] == r["speedup_best"] == 2.0 and r["base_s"] == 0.02 and r["s"] == 0.01
    assert r["rounds"] == 5 and calls == ["d", "a"] * 6  # one warm-up round, then 5 interleaved ones


def test_compare_rounds():
    from sparseprune.bench.timing import compare

    # two 5 ms calls a round within a 50 ms budget: the budget allows <= 5 rounds, min_rounds gives 5
    few = compare(lambda: time.sleep(0.005), {"a": lambda: time.sleep(0.005)}, "cpu", budget_s=0.05,
                  min_rounds=5)["a"]
    assert few["rounds"] == 5 and few["speedup"] > 0 and few["speedup_best"] > 0
    calls = []
    slow = compare(lambda: calls.append("d"), {"a": lambda: calls.append("a") or time.sleep(0.01)}, "cpu",
                   budget_s=0.005, warmup=1)["a"]
    assert slow["rounds"] == 3  # a round longer than the budget: 3 rounds, the sizing one included
    assert calls == ["d", "a"] * 4  # one warm-up round, then 3 timed (interleaved) rounds


def test_cold_copies_sizing():
    mib = 2**20
    n, note = cold_copies(10 * mib, 32 * mib, max_bytes=None)
    assert n == 7 and n * 10 * mib >= 64 * mib  # 2 x LLC
    n, _ = cold_copies(500 * mib, 32 * mib, max_bytes=None)
    assert n == 2  # never fewer than two copies
    n, _ = cold_copies(1 * mib, 8 * mib, max_bytes=None)
    assert n == 64  # the 64 MiB floor for caches that report little
    n, note = cold_copies(100 * mib, 300 * mib, max_bytes=400 * mib)
    assert n == 4 and "capped" in note and "still over the LLC" in note
    n, note = cold_copies(100 * mib, 300 * mib, max_bytes=200 * mib)
    assert "NOT over the LLC" in note
    with pytest.raises(ValueError):
        cold_copies(0, mib)


@pytest.mark.parametrize("cold", [False, True], ids=["hot", "cold"])
def test_wrong_kernel_result_is_refused_not_timed(cold):
    case = speed.resolve_cases(["2:4"])[0]
    with torch.inference_mode():
        w = torch.randn(512, 1024)
        prep = speed.prepare_case(case, "512x1024", w, [w], ["cpu"], False, cold=cold,
                                  llc_bytes=machine.llc_bytes()[0])
        assert speed.measure_batch(prep, 2, ["cold"] if cold else ["hot"], 0.001)  # intact: timed
        bad = prep.variants[0].copies[-1]  # cold: the last copy, which only a check of every copy sees
        bad.values[5].neg_()  # a real kernel on a corrupted weight: a wrong answer, not a crash
        with pytest.raises(RuntimeError, match="wrong result.*refusing to time"):
            speed.measure_batch(prep, 2, ["cold"] if cold else ["hot"], 0.001)


def test_check_result_refuses_nan_and_wrong_shape():
    want = torch.randn(4, 8)
    assert speed.check_result(want.clone(), want, torch.float32, "ok") == 0.0
    with pytest.raises(RuntimeError, match="refusing"):
        speed.check_result(torch.full_like(want, float("nan")), want, torch.float32, "nan")
    with pytest.raises(RuntimeError, match="shape"):
        speed.check_result(want[:, :4], want, torch.float32, "shape")
    # a bf16-rounded output passes at bf16's tolerance but not at fp32's
    rounded = want.bfloat16()
    speed.check_result(rounded, want, torch.bfloat16, "bf16")
    with pytest.raises(RuntimeError):
        speed.check_result(rounded + 0.05 * want.abs().max(), want, torch.bfloat16, "off by 5%")


def test_cli_bf16_hot_only(tmp_path):
    assert cli(["bench", "--dtype", "bf16", "--weights", "hot", "--shapes", "64x128", "--batches", "1,2",
                "--cases", "2:4,hybrid 87.5%,torch-bsr32 90%", "--auto-cases", "none", "--budget", "0.002",
                "--out", str(tmp_path), "--no-progress"]) == 0
    rows = _rows(tmp_path / "speed-bf16.csv")
    for r in rows:
        _check_metadata(r)
    assert {r["dtype"] for r in rows} == {"bf16"} and {r["weights"] for r in rows} == {"hot"}
    assert {r["pattern"] for r in rows if r["impl"] == "ours"} == {"2:4", "hybrid 87.5%"}
    assert not [r for r in rows if r["impl"] == "auto"]
    # PyTorch's BSR row is there exactly when PyTorch has a bf16 BSR kernel on this CPU
    try:
        torch.mm(torch.randn(64, 64).bfloat16().to_sparse_bsr((32, 32)), torch.randn(64, 2).bfloat16())
        torch_has_bf16_bsr = True
    except (RuntimeError, NotImplementedError):
        torch_has_bf16_bsr = False
    assert any(r["impl"] == "torch-bsr" for r in rows) == torch_has_bf16_bsr


def test_cli_default_out_is_the_machine_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(["bench", "--weights", "hot", "--shapes", "64x128", "--batches", "1", "--cases", "block32 90%",
                "--auto-cases", "none", "--budget", "0.001", "--no-progress"]) == 0
    assert (tmp_path / "benchmarks" / "results" / machine.cpu_label() / "speed-fp32.csv").exists()


EMR = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 207
model name\t: INTEL(R) XEON(R) PLATINUM 8581C CPU @ 2.10GHz
stepping\t: 2
flags\t\t: fpu avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile

processor\t: 1
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 207
model name\t: INTEL(R) XEON(R) PLATINUM 8581C CPU @ 2.10GHz
"""


@pytest.mark.parametrize("vendor,name,family,model,stepping,label", [
    ("AuthenticAMD", "AMD EPYC", 25, 1, 1, "cpu-epyc-zen3-2core"),
    ("AuthenticAMD", "AMD EPYC", 25, 17, 1, "cpu-epyc-zen4-2core"),
    ("AuthenticAMD", "AMD EPYC 9655", 26, 2, 1, "cpu-epyc-zen5-2core"),
    ("GenuineIntel", "Intel(R) Xeon(R) Platinum 8481C", 6, 143, 8, "cpu-xeon-spr-2core"),
    ("GenuineIntel", "Intel(R) Xeon(R) Gold 6248", 6, 85, 7, "cpu-xeon-clx-2core"),
    ("AuthenticAMD", "AMD Mystery", 99, 3, 0, "cpu-amd-f99m3-2core"),
    ("", "", None, None, None, None),
])
def test_cpu_labels(vendor, name, family, model, stepping, label):
    cpu = machine.CpuId(vendor, name, family, model, stepping, frozenset())
    got = machine.cpu_label(cpu, cpus=2)
    if label is None:  # neither vendor nor family: the architecture names the folder
        import platform
        assert got == f"cpu-{platform.machine().lower() or 'cpu'}-2core"
    else:
        assert got == label


def test_cpuinfo_file_is_parsed(tmp_path):
    p = tmp_path / "cpuinfo"
    p.write_text(EMR)
    cpu = machine.cpu_id(str(p))
    assert (cpu.vendor, cpu.family, cpu.model, cpu.stepping) == ("GenuineIntel", 6, 207, 2)
    assert {"amx_tile", "amx_bf16"} <= cpu.flags
    assert machine.cpu_label(cpu, cpus=2) == "cpu-xeon-emr-2core"
    here = machine.cpu_label()
    assert here.startswith("cpu-") and here.endswith(f"-{len(os.sched_getaffinity(0))}core")


def test_llc_from_a_sysfs_tree(tmp_path):
    def cache(cpu, idx, level, typ, size, shared):
        d = tmp_path / f"cpu{cpu}" / "cache" / f"index{idx}"
        d.mkdir(parents=True)
        for name, val in (("level", level), ("type", typ), ("size", size), ("shared_cpu_list", shared)):
            (d / name).write_text(f"{val}\n")

    for cpu in range(4):  # two L3 instances of 16 MB (two CCDs), private L2
        cache(cpu, 0, 1, "Data", "32K", str(cpu))
        cache(cpu, 1, 1, "Instruction", "32K", str(cpu))
        cache(cpu, 2, 2, "Unified", "1024K", str(cpu))
        cache(cpu, 3, 3, "Unified", "16384K", "0-1" if cpu < 2 else "2-3")
    assert machine.llc_from_sysfs(str(tmp_path)) == (3, 32 << 20)
    assert machine.llc_from_sysfs(str(tmp_path / "none")) is None


@pytest.mark.skipif(shutil.which("lscpu") is None, reason="no lscpu to cross-check sysfs against")
def test_llc_read_agrees_with_lscpu():
    out = subprocess.run(["lscpu", "-C", "--bytes"], capture_output=True, text=True).stdout.split("\n")
    head = out[0].split()
    rows = [dict(zip(head, line.split())) for line in out[1:] if line.strip()]
    top = max((r for r in rows if r["TYPE"] != "Instruction"), key=lambda r: int(r["LEVEL"]))
    assert machine.llc_bytes()[0] == int(top["ALL-SIZE"])


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_scripts_record_the_same_metadata(tmp_path):
    keys = set(machine.run_metadata("cpu"))
    _load_script("bench_cpu_kernels").main(["--n", "64", "--k", "128", "--batches", "1", "--rounds", "1",
                                             "--dtypes", "fp32", "--patterns", "semi24",
                                             "--threads", str(torch.get_num_threads()),
                                             "--csv", str(tmp_path / "k.csv")])
    _load_script("bench_auto").main(["--shapes", "attn-proj-1024", "--batches", "1", "--budget", "0.001",
                                     "--out", str(tmp_path)])
    for path in (tmp_path / "k.csv", tmp_path / "auto-fp32.csv"):
        rows = _rows(path)
        assert rows and keys <= set(rows[0]), f"{path.name} lacks {keys - set(rows[0])}"
        for r in rows:
            _check_metadata(r)
        meta = json.loads(path.with_suffix(".json").read_text())
        assert keys <= set(meta)


# --- sparseprune bench --models: whole models, dense vs every style ------------------------------------

from sparseprune.bench import model_speed  # noqa: E402

TINY_LLAMA = model_speed.LlamaSize(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=256,
                                   prefill_tokens=16, prompt_tokens=4, new_tokens=4)
TINY_RESNET = model_speed.ResNetSize(width=8, resolution=32)
# (metric, batch) per model for the batches the fixture asks for
TINY_METRICS = {"llama": {("prefill", 1), ("decode", 1), ("decode", 3)}, "resnet50": {("images", 1), ("images", 2)}}
MODEL_ROWS = {("dense", "dense", "dense")} | {(s.label, impl, b) for s in model_speed.STYLES if s.kernels
                                              for impl, b in (("ours", "cpu"), ("auto", "auto"))} | {
    (s.label, "channel", "dense") for s in model_speed.STYLES if not s.kernels}


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def models_run(tmp_path_factory):
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("models")
    rows = model_speed.run(str(out), quick=True, dtype="fp32", decode_batches=[1, 3], image_batches=[1, 2], rounds=2,
                           budget_s=0.001, llama_size=TINY_LLAMA, resnet_size=TINY_RESNET, log=_quiet)
    return out, rows


def test_models_run_writes_every_row_and_file(models_run):
    out, rows = models_run
    for ext in ("csv", "txt", "json", "png"):
        assert (out / f"models-fp32-quick.{ext}").stat().st_size > 0, ext
    written = _rows(out / "models-fp32-quick.csv")
    assert len(written) == len(rows)
    got = {}
    for r in written:
        _check_metadata(r)
        assert r["dtype"] == "fp32"
        key = (r["model"], r["style"], r["impl"], r["backend"], r["metric"], int(r["batch"]))
        assert key not in got, f"duplicate row {key}"
        got[key] = r
        for col in ("s_dense", "s_style", "rate_dense", "rate", "speedup", "speedup_best", "weights_mb"):
            v = float(r[col])
            assert math.isfinite(v) and v > 0, (key, col, r[col])
        assert int(r["rounds"]) >= 2
        # tiny models: far below the LLC, and the row says so
        assert r["weights"] == ("cold" if float(r["weights_over_llc"]) > 2 else "hot") == "hot"
    want = {(model, *row, metric, batch) for model, metrics in TINY_METRICS.items() for row in MODEL_ROWS
            for metric, batch in metrics}
    assert set(got) == want, (set(got) ^ want)
    # decode rows count only the decode steps: batch * (new_tokens - 1) tokens per timed call
    for r in written:
        if r["metric"] == "decode":
            assert float(r["rate"]) == pytest.approx(int(r["batch"]) * 3 / float(r["s_style"]), rel=1e-3)
    meta = json.loads((out / "models-fp32-quick.json").read_text())
    assert all(k in meta for k in REQUIRED if k != "weights") and meta["loadavg_after"] is not None
    assert meta["grid"]["styles"] == [s.label for s in model_speed.STYLES] and meta["grid"]["backends"] == ["cpu"]
    for model in TINY_METRICS:
        info = meta["models"][model]
        assert info["dense_bytes"] > 0 and info["params"] > 0
        for name, v in info["variants"].items():
            for check in v["checks"].values():
                assert check["error"] <= check["allowed"], (model, name, check)
    text = (out / "models-fp32-quick.txt").read_text()
    assert "ours[cpu]" in text and " auto " in text and "dense modules" in text
    assert _proc_cpuinfo_field("model name") in text


def test_models_ours_rows_ran_our_kernels_auto_rows_say_how_many(models_run):
    _, rows = models_run
    for r in rows:
        if r["impl"] == "ours":
            # every converted layer ran the cpu backend (check_variant refuses otherwise); some were converted
            assert r["layers_packed"] > 0 and r["layers_sparse"] == r["layers_packed"], r
            assert r["backend_used"] == f"cpu:{r['layers_packed']}"
        elif r["impl"] == "auto":
            used = dict(kv.split(":") for kv in r["backend_used"].split(","))
            assert set(used) <= {"cpu", "dense"} and sum(map(int, used.values())) == r["layers_packed"]
            assert r["layers_sparse"] == int(used.get("cpu", 0))
        else:  # dense and channel rows: ordinary modules only
            assert r["layers_packed"] == 0 and r["layers_sparse"] == 0 and r["backend_used"] == "dense modules"
        if r["impl"] == "channel":
            assert r["weights_mb"] < r["dense_weights_mb"]
    # some layers always stay dense: the LM head (excluded), ResNet's stem conv (3 input channels)
    assert all(r["layers_packed"] < r["layers"] for r in rows)


def _tiny_llama_bench(batches=(2,)):
    pytest.importorskip("transformers")
    return model_speed.build_llama(TINY_LLAMA, torch.float32, "cpu", list(batches))


@pytest.mark.parametrize("model", ["llama", "resnet50"])
def test_models_explicit_variant_is_our_modules_on_cpu(model):
    if model == "llama":
        bench, cls = _tiny_llama_bench(), sparseprune.SparseLinear
    else:
        bench = model_speed.build_resnet50(TINY_RESNET, torch.float32, "cpu", [2])
        cls = sparseprune.SparseConv2d
    style = model_speed.resolve_styles(["2:4"])[0]
    with torch.no_grad():
        refs = model_speed.reference_outputs(bench, style)
        ours, auto = model_speed.build_variants(bench, style, ["cpu"])
        assert (ours.row, ours.impl, auto.row, auto.impl) == ("cpu", "ours", "auto", "auto")
        packed = [m for m in ours.model.modules() if isinstance(m, model_speed.PackedModule)]
        assert packed and len(packed) == ours.packed and any(isinstance(m, cls) for m in packed)
        assert all(m.backend == "cpu" and m.backend_request == "cpu" for m in packed)
        model_speed.check_variant(bench, style, ours, refs)
        assert all(c[2] == {"cpu": ours.packed} for c in ours.checks.values())
        # a converted layer switched to dense under the cpu row's name is refused
        packed[0].set_backend("dense")
        with pytest.raises(RuntimeError, match="not all on backend 'cpu'"):
            model_speed.check_variant(bench, style, ours, refs)


@pytest.mark.parametrize("model,style,bug", [
    *[("llama", s, b) for s in ("2:4", "block32 90%", "hybrid 87.5%") for b in ("off", "nan")],
    ("resnet50", "2:4", "off"), ("resnet50", "block32 90%", "off")])
def test_models_wrong_kernel_is_refused_not_timed(model, style, bug, monkeypatch):
    from sparseprune import backends

    if model == "llama":
        bench = _tiny_llama_bench()
    else:  # SparseConv2d runs the same backend forward on its unfolded patches
        bench = model_speed.build_resnet50(TINY_RESNET, torch.float32, "cpu", [2])
    st = model_speed.resolve_styles([style])[0]
    with torch.no_grad():
        refs = model_speed.reference_outputs(bench, st)
        v = model_speed.build_variants(bench, st, ["cpu"])[0]
        model_speed.check_variant(bench, st, v, refs)  # the real kernels: pass
        right = backends.CpuBackend.forward

        def wrong(self, module, x):  # one output feature off (or unwritten: NaN) in every call
            y = right(self, module, x)
            y[..., 0] = float("nan") if bug == "nan" else y[..., 0] + 0.05
            return y

        monkeypatch.setattr(backends.CpuBackend, "forward", wrong)
        with pytest.raises(RuntimeError, match="wrong result.*refusing to time"):
            model_speed.check_variant(bench, st, v, refs)


@pytest.mark.parametrize("style", ["2:4", "channel 50%"])
def test_models_corrupted_weight_is_refused_not_timed(style):
    bench = _tiny_llama_bench()
    st = model_speed.resolve_styles([style])[0]
    with torch.no_grad():
        refs = model_speed.reference_outputs(bench, st)
        v = model_speed.build_variants(bench, st, ["cpu"])[0]
        model_speed.check_variant(bench, st, v, refs)
        down = v.model.get_submodule("model.layers.0.mlp.down_proj")  # feeds the residual stream directly
        if st.kernels:  # a real kernel on a corrupted packed weight: a wrong answer, not a crash
            assert isinstance(down, model_speed.PackedModule)
            down.values[0].neg_()
        else:  # a shrunk layer that lost a weight
            down.weight[:, 0].mul_(-3)
        with pytest.raises(RuntimeError, match="wrong result.*refusing to time"):
            model_speed.check_variant(bench, st, v, refs)


def test_decode_seconds_and_rate():
    # token 1 at t = 10 s (out of the prefill), then 3 decode steps of 0.5 s each
    s = model_speed.decode_seconds([10.0, 10.5, 11.0, 11.5], 4)
    assert s == pytest.approx(1.5)
    assert model_speed.decode_rate(8, 4, s) == pytest.approx(8 * 3 / 1.5)
    with pytest.raises(RuntimeError, match="produced 3 tokens"):
        model_speed.decode_seconds([1.0, 2.0, 3.0], 4)
    with pytest.raises(ValueError, match="at least 2"):
        model_speed.decode_seconds([1.0], 1)
    with pytest.raises(RuntimeError, match="backwards"):
        model_speed.decode_seconds([1.0, 3.0, 2.0], 3)


def test_decode_call_times_the_decode_steps_of_one_generate():
    bench = _tiny_llama_bench((2,))
    decode = next(m for m in bench.metrics if m.name == "decode")
    assert decode.self_timed and decode.items == 2 * (TINY_LLAMA.new_tokens - 1)
    fn = decode.call(bench.dense)
    with torch.no_grad():
        fn()
        t0 = time.perf_counter()
        s = fn()
        wall = time.perf_counter() - t0
    assert 0 < s < wall  # the prefill and generate's setup are not in it


def test_cli_models_subset(tmp_path):
    # (channel only: the kernel styles' rows, auto's measuring included, are the fixture's)
    assert cli(["bench", "--models", "resnet50", "--quick", "--styles", "channel 50%", "--image-batches", "1,2",
                "--rounds", "1", "--budget", "0.001", "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path / "models-fp32-quick.csv")
    assert {(r["model"], r["style"], r["impl"], r["metric"], r["batch"]) for r in rows} == {
        (m, s, i, "images", b) for m, s, i in (("resnet50", "dense", "dense"), ("resnet50", "channel 50%", "channel"))
        for b in ("1", "2")}
    assert {r["seq"] for r in rows} == {str(model_speed.RESNET_SIZES["quick"].resolution)}


@pytest.mark.parametrize("argv,message", [
    (["--models", "gpt2"], "unknown model"),
    (["--models", "--styles", "block 33%"], "unknown style"),
    (["--models", "--decode-batches", "0"], "positive integers"),
    (["--models", "--image-batches", "x"], "positive integers"),
    (["--models", "--rounds", "0"], "positive integer"),
    (["--models", "--accuracy"], "not allowed with"),
    (["--models", "--dtype", "fp8"], "invalid choice"),
])
def test_cli_models_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["bench", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("kw,message", [
    (dict(models=["llama", "bert"]), "unknown model"), (dict(models=[]), "no models"),
    (dict(styles=["2:4", "block32 33%"]), "unknown style"), (dict(styles=[]), "no styles"),
    (dict(decode_batches=[1, 0]), "decode batches"), (dict(image_batches=[2.5]), "image batches"),
    (dict(rounds=0), "rounds"), (dict(dtype="fp8"), "dtype"),
])
def test_models_run_refuses_bad_arguments_before_building(kw, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        model_speed.run(str(tmp_path), **kw)
    assert not list(tmp_path.iterdir())
