"""The accuracy study's plumbing on a tiny task (the real study trains for minutes)."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

from sparseprune.bench import accuracy as acc


def _tiny_task() -> acc.Task:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(64, 32) * (1 + 4 * torch.rand(32))
    y = model(x).argmax(-1)

    def evaluate(m):
        with torch.no_grad():
            return 100.0 * (m(x).argmax(-1) == y).float().mean().item()

    return acc.Task("tiny", model, [x[:32], x[32:]], evaluate, "acc%", True, ["0", "2"],
                    lambda m: acc._capture_inputs(m, lambda mm: mm(x[:1]), ""), notes={})


STYLES = [s for s in acc.STYLES if s.label in (
    "dense", "unstructured 50% wanda", "2:4 magnitude", "2:4 sparsegpt +perm", "4:8 wanda", "hybrid 75% sparsegpt",
    "channel 50% flap")]


def test_run_task_rows_and_outputs(tmp_path):
    styles = [acc.Style(s.label, s.pattern, s.method, s.sparsity, s.permute, block=16) for s in STYLES]
    rows = acc.run_task(_tiny_task(), torch.device("cpu"), quick=True, log=lambda *a: None, styles=styles,
                       timing_budget_s=0.02)
    assert [r["style"] for r in rows] == [s.label for s in styles]
    by = {r["style"]: r for r in rows}
    assert by["dense"]["value"] == 100.0
    for r in rows:
        if r["pattern"] in ("unstructured", "4:8"):
            assert r["speedup_b1"] is None and r["value_converted"] is None  # no kernels: n/a
        elif r["pattern"] != "dense":
            assert r["speedup_b1"] > 0 and r["speedup_b64"] > 0
            # the converted (packed, possibly permuted) model computes what the pruned one does
            assert r["value_converted"] == pytest.approx(r["value"], abs=2.0)
    meta = {"device": "cpu", "quick": True}
    acc.write_csv(rows, str(tmp_path / "accuracy.csv"), meta)
    acc.plot(rows, str(tmp_path / "accuracy.png"))
    with open(tmp_path / "accuracy.csv") as fh:
        got = list(csv.DictReader(fh))
    assert len(got) == len(rows) and got[0]["device"] == "cpu"
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    assert "n/a" in acc.format_table(rows)


def _row(style, value, pattern="2:4", sparsity=0.5):
    return {"model": "lm", "style": style, "value": value, "metric": "ppl", "pattern": pattern, "sparsity": sparsity}


def test_check_targets_logic():
    rows = [_row("dense", 10.0, "dense", 0.0), _row("2:4 magnitude", 20.0), _row("2:4 magnitude +perm", 18.0),
            _row("2:4 wanda", 14.0), _row("2:4 wanda +perm", 13.0), _row("2:4 sparsegpt", 12.0),
            _row("2:4 sparsegpt +perm", 12.5), _row("unstructured 50% wanda", 11.0, "unstructured")]
    res = {t: ok for t, ok, _ in acc.check_targets(rows)}
    assert res["2:4 sparsegpt recovers >= 67% of what magnitude loses"] is True  # 80%
    assert res["2:4 wanda recovers >= 50% of what magnitude loses"] is True  # 60%
    assert res["permutation improves 2:4 wanda"] is True
    assert res["permutation improves 2:4 sparsegpt"] is False
    assert res["unstructured 50% is the ceiling for 50% structured styles"] is True


def test_stdlib_text_ships_offline():
    train, val = acc.stdlib_text(200_000)
    assert train.numel() == 200_000 and val.numel() >= 25_000
    assert int(train.max()) < 256


def test_lm_task_trains_once_then_loads_from_cache(tmp_path):
    """The trained LM is saved and the next run loads it (it used to crash building a scheduler for 0 steps)."""
    pytest.importorskip("transformers")
    size = acc.LMSize(hidden=32, inter=64, layers=2, steps=3, batch=2, train_bytes=150_000, val_windows=4,
                      calib_batches=1)
    logs = []
    first = acc.build_lm_task(True, torch.device("cpu"), log=logs.append, cache_dir=str(tmp_path), size=size)
    assert first.notes["trained"] and len(list(tmp_path.glob("accuracy_lm_*.safetensors"))) == 1
    second = acc.build_lm_task(True, torch.device("cpu"), log=logs.append, cache_dir=str(tmp_path), size=size)
    assert not second.notes["trained"] and any("loaded" in line for line in logs)
    assert second.evaluate(second.model) == first.evaluate(first.model)
    # same calibration bytes whether the model was trained or loaded
    assert all(torch.equal(a, b) for a, b in zip(first.calibration, second.calibration))


def test_digits_task_builds_and_scores():
    """The study's second model, as the study builds it (quick mode trains in about two seconds)."""
    pytest.importorskip("sklearn")
    task = acc.build_digits_task(True, torch.device("cpu"), log=lambda *a: None)
    assert task.name == "digits" and task.metric == "acc%" and task.higher_is_better
    assert 90.0 < task.evaluate(task.model) <= 100.0
    assert sum(x.shape[0] for x in task.calibration) == 512
    inputs = task.timing_inputs(task.model)
    assert set(inputs) == {"0", "2", "4"} and all(x.shape[0] == 1 for x in inputs.values())


def test_cnn_rows_time_convs_and_shrunk_layers():
    """The CNN task's styles on an untrained tiny CNN: channel pruning shrinks convs and is timed
    layer by layer on the inputs of the shrunk model; the picks at equal speedup come from the rows."""
    from sparseprune.bench.models import digits_cnn

    model = digits_cnn(width=8).eval()
    x = torch.randn(48, 1, 8, 8)
    y = model(x).argmax(-1)

    def evaluate(m):
        with torch.no_grad():
            return 100.0 * (m(x).argmax(-1) == y).float().mean().item()

    task = acc.Task("cnn", model, [x[:24], x[24:]], evaluate, "acc%", True, None,
                    lambda m: acc._capture_inputs(m, lambda mm: mm(x[:1]), ""), notes={})
    inputs = task.timing_inputs(model)
    assert inputs["0"].shape == (1, 1, 8, 8) and inputs["11"].shape == (1, 256)
    styles = [s for s in acc.STYLES if s.label in ("dense", "channel 50% magnitude", "channel 25% sparsegpt")]
    rows = acc.run_task(task, torch.device("cpu"), quick=True, log=lambda *a: None, styles=styles,
                        timing_budget_s=0.02)
    by = {r["style"]: r for r in rows}
    for label in ("channel 50% magnitude", "channel 25% sparsegpt"):
        r = by[label]
        assert r["value_converted"] == pytest.approx(r["value"], abs=2.5)  # the shrunk model is the masked one
        assert r["speedup_b1"] > 0 and r["speedup_b64"] > 0 and r["layers_pruned"] == 5
    picks = dict(acc.least_loss_at_speedup(rows, "cnn", levels=(1.0, 1e9)))
    assert picks[1e9] is None and picks[1.0] is not None


def test_run_writes_table_text_and_keeps_models_out_of_results(tmp_path):
    """run() writes accuracy.csv/.png/.txt to the results folder (the .txt with the machine line, the
    table and the least-loss lines) and caches trained models elsewhere."""
    from sparseprune.bench import accuracy as acc

    out, cache = tmp_path / "results", tmp_path / "cache"
    styles = [s for s in acc.STYLES if s.label in ("dense", "2:4 magnitude", "channel 50% magnitude")]
    rows = acc.run(str(out), quick=True, tasks=("digits",), styles=styles, cache_dir=str(cache))
    assert [r["style"] for r in rows] == ["dense", "2:4 magnitude", "channel 50% magnitude"]
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.csv", "accuracy.json", "accuracy.png", "accuracy.txt"]
    text = (out / "accuracy.txt").read_text()
    assert "isa " in text.splitlines()[0] and "2:4 magnitude" in text and "least loss at equal speedup (digits" in text
