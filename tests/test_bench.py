"""`sparseprune bench` and the benchmark scripts: metadata, hot and cold weights, honest rows.

Small shapes and tiny timing budgets: these check what the benchmark records and refuses, not speed.
"""

from __future__ import annotations

import csv
import datetime
import importlib.util
import json
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
