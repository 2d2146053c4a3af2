"""Static and host-side checks of the CUDA backend's sources and GPU scripts (no nvcc, no GPU needed).

* no header defines a non-template __global__ (every .cu including it would define the kernel again);
* every repository path a CUDA source, its tests or its scripts mention exists;
* benchmarks/bench_cuda.py runs as a script, where the tests package is not importable;
* benchmarks/gpu_suite.sh fails, not passes, without the CUDA backend, and when CUDA tests skip.
"""

import ast
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA = ROOT / "csrc" / "cuda"


def _strip_comments(src: str) -> str:
    return re.sub(r"//[^\n]*|/\*.*?\*/", "", src, flags=re.S)


def test_headers_define_no_plain_global_functions():
    for h in sorted(CUDA.glob("*.cuh")):
        lines = _strip_comments(h.read_text()).splitlines()
        for i, line in enumerate(lines):
            if "__global__" not in line:
                continue
            before = " ".join(l.strip() for l in lines[max(0, i - 2):i] if l.strip())
            assert re.search(r"template\s*<[^>]*>\s*$", before) or line.strip().startswith("template"), \
                f"{h.name}:{i + 1}: a non-template __global__ in a header is defined again by every .cu including it"


def _mentioned_paths(text: str):
    return set(re.findall(r"\b((?:csrc|sparseprune|tests|benchmarks|tools)/[\w./-]*\w\.(?:cuh|cu|h|cpp|py|sh|md|txt))",
                          text))


def test_paths_in_cuda_sources_exist():
    files = [*CUDA.rglob("*.cuh"), *CUDA.rglob("*.cu"), *CUDA.rglob("*.h"), *CUDA.rglob("*.cpp"),
             *CUDA.rglob("*.txt"), *CUDA.rglob("*.md"), ROOT / "sparseprune/cuda.py", ROOT / "sparseprune/cuda_layout.py",
             *ROOT.glob("tests/test_cuda_*.py"), ROOT / "tests/cuda_emu.py", ROOT / "benchmarks/bench_cuda.py",
             ROOT / "benchmarks/gpu_suite.sh", ROOT / "benchmarks/gpu_suite_checks.py"]
    # a path whose folder is ours must exist (paths into other projects, e.g. CUTLASS's tools/util/..., are not ours)
    missing = {(f.relative_to(ROOT).as_posix(), p) for f in files for p in _mentioned_paths(f.read_text())
               if (ROOT / p).parent.is_dir() and not (ROOT / p).exists()}
    assert not missing, f"comments name files that do not exist: {sorted(missing)}"


def test_benchmarks_never_import_tests():
    for f in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "tests" or n.startswith("tests.") for n in names), \
                f"{f.name} imports the tests package, which a benchmark run as a script cannot import"


def test_bench_cuda_runs_as_a_script(tmp_path):
    # as gpu_suite.sh runs it: `python benchmarks/bench_cuda.py` puts benchmarks/, not the repo, on sys.path.
    # Here from an unrelated directory, building the benchmark's weights on the CPU.
    code = textwrap.dedent(f"""
        import runpy, torch
        g = runpy.run_path({str(ROOT / 'benchmarks' / 'bench_cuda.py')!r})
        ws = g["build_weights"](128, 256, torch.float16, "cpu")
        assert set(ws) == {{"dense", "semi24", "bsr", "hybrid"}}
        print("ok", ws["semi24"][0].shape)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def _run_suite(tmp_path, **env):
    e = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    e.update(OUT=str(tmp_path), PATH=f"{Path(sys.executable).parent}:{e.get('PATH', '')}", **env)
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh")], capture_output=True, text=True,
                          env=e, timeout=300)


@pytest.mark.skipif("cuda" in __import__("sparseprune").build_info()["backends"], reason="this build has CUDA")
def test_gpu_suite_fails_without_the_cuda_backend(tmp_path):
    r = _run_suite(tmp_path, SKIP_INSTALL="1", STAGES="tests")
    assert r.returncode != 0, r.stdout
    assert "FAIL: the CUDA backend was not built" in r.stdout, r.stdout + r.stderr
    assert "== tests (gpu)" not in r.stdout  # stopped before any stage could "pass"


def _junit(tmp_path, cases):
    body = "".join(f'<testcase classname="{c}" name="{n}">{"<skipped message=%r/>" % m if m else ""}</testcase>'
                   for c, n, m in cases)
    p = tmp_path / "junit.xml"
    p.write_text(f'<testsuites><testsuite name="pytest">{body}</testsuite></testsuites>')
    return str(p)


def test_gpu_suite_fails_when_cuda_tests_skip(tmp_path):
    check = [sys.executable, str(ROOT / "benchmarks" / "gpu_suite_checks.py"), "no-skips"]
    ok = _junit(tmp_path, [("tests.test_cuda_gpu", "test_a", None), ("tests.test_triton", "test_b", "no sm_90")])
    assert subprocess.run([*check, ok], capture_output=True).returncode == 0
    bad = _junit(tmp_path, [("tests.test_cuda_gpu", "test_a", "backend 'cuda': no kernels")])
    r = subprocess.run([*check, bad], capture_output=True, text=True)
    assert r.returncode == 1 and "1 CUDA-backend tests skipped" in r.stdout
    empty = _junit(tmp_path, [])
    assert subprocess.run([*check, empty], capture_output=True).returncode == 1


def test_gpu_suite_has_a_sanitizer_stage():
    # runs only on a GPU machine; here: the stage exists, covers both tools, fails the suite on an error, and the
    # test it runs exists
    s = (ROOT / "benchmarks" / "gpu_suite.sh").read_text()
    assert "--tool \"$tool\"" in s and "for tool in memcheck racecheck" in s and "--error-exitcode" in s
    assert "def test_sanitizer_run" in (ROOT / "tests" / "test_cuda_gpu.py").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_suite.sh")]).returncode == 0
