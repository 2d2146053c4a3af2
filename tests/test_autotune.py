"""backend="auto": per-bucket decisions, dense fallback and its memory, caches in memory and on disk."""

import json

import pytest
import torch
from torch import nn

import sparseprune
from sparseprune import autotune, backends
from sparseprune.autotune import BUCKET_EDGES as AUTO_BUCKET_EDGES
from sparseprune.autotune import bucket_of as autotune_bucket
from sparseprune.modules import SparseLinear
from tests.helpers import assert_matches_reference, random_weight


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.delenv("SPARSEPRUNE_AUTOTUNE_CACHE", raising=False)
    monkeypatch.delenv("SPARSEPRUNE_AUTOTUNE", raising=False)
    autotune.clear_cache()
    yield
    autotune.clear_cache()


def fake_measure(ratios_by_rows, calls=None):
    """A measure() that returns fixed ratios of 'cpu' to dense at MEASURE_ROWS."""
    def measure(module, candidates, **kw):
        if calls is not None:
            calls.append(module)
        return {"dense": [1.0] * 5, "cpu": list(ratios_by_rows)}
    return measure


def test_bucket_edges():
    assert AUTO_BUCKET_EDGES == (1, 8, 64, 512)
    assert [autotune_bucket(r) for r in (0, 1, 2, 8, 9, 64, 65, 512, 513, 10**6)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert len(autotune.BUCKET_LABELS) == len(AUTO_BUCKET_EDGES) + 1 == len(autotune.BUCKET_POINTS)


def test_decide_needs_both_edges():
    # cpu wins at 1 and 8 rows, ties at 64 (within slack), loses at 512 and 1024
    plan = autotune.decide({"dense": [1] * 5, "cpu": [0.5, 0.8, 1.02, 1.5, 2.0]})
    assert plan == ("cpu", "cpu", "cpu", "dense", "dense")
    plan = autotune.decide({"dense": [1] * 5, "cpu": [0.5, 1.2, 0.9, 0.9, 0.9]})
    assert plan == ("cpu", "dense", "dense", "cpu", "cpu")
    # the best of several sparse candidates
    plan = autotune.decide({"dense": [1] * 5, "a": [0.9] * 5, "b": [0.5] * 5})
    assert plan == ("b",) * 5


def test_dense_copy_only_when_a_bucket_runs_dense(monkeypatch):
    packed, wd = random_weight("semi24", 64, 128)
    m = SparseLinear(packed, torch.randn(64))
    monkeypatch.setattr(autotune, "measure", fake_measure([0.5, 0.5, 0.5, 3, 3]))
    plan = autotune.tune_module(m)
    assert plan == {"1": "cpu", "2-8": "cpu", "9-64": "cpu", "65-512": "dense", "513+": "dense"}
    assert "dense_weight" in m._buffers and "dense_weight" not in m.state_dict()
    assert m.dense_weight.shape == (64, 128)
    for b in (0, 1, 5, 64, 65, 700):
        x = torch.randn(b, 128)
        assert_matches_reference(m(x), x, wd, m.bias)
    autotune.clear_cache()
    monkeypatch.setattr(autotune, "measure", fake_measure([0.5] * 5))
    autotune.tune_module(m, force=True)
    assert "dense_weight" not in m._buffers  # memory given back


def test_memory_cache_measures_each_signature_once(monkeypatch):
    calls = []
    monkeypatch.setattr(autotune, "measure", fake_measure([0.5] * 5, calls))
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)], nn.Linear(64, 32))
    sparseprune.convert(model, "2:4")
    assert len(calls) == 2  # two distinct shapes
    assert all(m.auto_plan == dict.fromkeys(autotune.BUCKET_LABELS, "cpu") for m in model)


def test_disk_cache_opt_in(tmp_path, monkeypatch):
    path = tmp_path / "tune.json"
    monkeypatch.setenv("SPARSEPRUNE_AUTOTUNE_CACHE", str(path))
    calls = []
    monkeypatch.setattr(autotune, "measure", fake_measure([0.5, 0.5, 2, 2, 2], calls))
    packed, _ = random_weight("bsr", 64, 64, block=(16, 16))
    autotune.tune_module(SparseLinear(packed))
    data = json.loads(path.read_text())
    (dkey, entries), = data.items()
    assert dkey.startswith("cpu:") and f"torch={torch.__version__}" in dkey and "sparseprune=" in dkey
    (sig, plan), = entries.items()
    assert sig.startswith("bsr|float32|64x64|block=(16, 16)") and plan == ["cpu", "cpu", "dense", "dense", "dense"]
    autotune.clear_cache()  # a new process: reads the file instead of measuring
    m2 = SparseLinear(packed)
    autotune.tune_module(m2)
    assert len(calls) == 1 and m2.auto_plan["9-64"] == "dense"


def test_corrupt_disk_cache_is_ignored(tmp_path, monkeypatch):
    path = tmp_path / "tune.json"
    path.write_text("{broken")
    monkeypatch.setattr(autotune, "measure", fake_measure([0.5] * 5))
    packed, _ = random_weight("semi24", 32, 32)
    with pytest.warns(UserWarning, match="unreadable"):
        plan = autotune.tune_module(SparseLinear(packed), cache_path=str(path))
    assert set(plan.values()) == {"cpu"}
    assert json.loads(path.read_text())  # rewritten


def test_autotune_off(monkeypatch):
    monkeypatch.setenv("SPARSEPRUNE_AUTOTUNE", "0")
    monkeypatch.setattr(autotune, "measure", lambda *a, **k: pytest.fail("measured while disabled"))
    packed, _ = random_weight("hybrid", 32, 64, block=(16, 16))
    m = SparseLinear(packed)
    m(torch.randn(2, 64))
    assert set(m.auto_plan.values()) == {"cpu"} and "dense_weight" not in m._buffers


def test_report_says_when_layers_stay_dense(monkeypatch):
    monkeypatch.setattr(autotune, "measure", fake_measure([3] * 5))
    model = nn.Sequential(nn.Linear(64, 64))
    sparseprune.convert(model, "2:4")
    lr = model.sparseprune_report["0"]
    assert lr.backend == "dense" and "no sparse backend beat dense" in lr.reason
    assert "dense" in str(model.sparseprune_report)


def test_real_measurement_is_bounded_and_correct():
    """Real timings (no fakes): any plan must give dense-equivalent results at every bucket."""
    import time

    packed, wd = random_weight("semi24", 128, 256)
    m = SparseLinear(packed, torch.randn(128))
    t0 = time.perf_counter()
    plan = autotune.tune_module(m)
    assert time.perf_counter() - t0 < 30  # a few ms per candidate and size, plus warm-ups (loose on busy CI)
    assert set(plan) == set(autotune.BUCKET_LABELS) and set(plan.values()) <= {"cpu", "dense"}
    for b in (1, 4, 30, 100, 600):
        x = torch.randn(b, 256)
        assert_matches_reference(m(x), x, wd, m.bias)


def test_moving_device_type_forgets_plan(monkeypatch):
    monkeypatch.setattr(autotune, "measure", fake_measure([3] * 5))
    packed, _ = random_weight("semi24", 32, 32)
    m = SparseLinear(packed)
    autotune.tune_module(m)
    assert m._plan is not None
    m.set_backend("auto")  # rebinding (as after a move to another device type) drops the plan
    assert m._plan is None and "dense_weight" not in m._buffers
    m(torch.randn(1, 32))  # measured again on first call outside torch.compile
    assert m._plan is not None and all(b is backends.get_backend("dense") for b in m._plan)


def test_cast_model_is_measured_again(monkeypatch):
    calls = []
    monkeypatch.setattr(autotune, "measure", fake_measure([0.5] * 5, calls))
    model = sparseprune.convert(nn.Sequential(nn.Linear(64, 64)), "2:4")
    assert len(calls) == 1
    model.to(torch.bfloat16)
    model(torch.randn(2, 64, dtype=torch.bfloat16))
    assert len(calls) == 2 and model[0]._plan_dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["semi24", "bsr", "hybrid"])
def test_cuda_auto_plan_is_correct(kind):
    packed, wd = random_weight(kind, 128, 256, torch.float16, block=(32, 32), device="cuda")
    m = SparseLinear(packed, backend="auto")
    plan = autotune.tune_module(m)
    assert set(plan.values()) <= set(backends.available_backends("cuda"))
    for b in (1, 5, 40, 300, 700):
        x = torch.randn(b, 256, device="cuda", dtype=torch.float16)
        assert_matches_reference(m(x), x, wd)
