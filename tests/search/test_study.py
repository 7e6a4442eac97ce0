import pytest

import modelpress as mp
from modelpress.search.study import pareto_front, redact

optuna = pytest.importorskip("optuna")


def _toy():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_target import _toy as toy

    return toy()


@pytest.mark.parametrize("search, storage", [("optuna", None), ("random", "sqlite")])
def test_a_tiny_study_runs_and_chooses_a_feasible_point(tmp_path, search, storage):
    model, task, calib = _toy()
    url = f"sqlite:///{tmp_path / 'study.db'}" if storage else None
    target = mp.Target(ratio=5, search=search, trials=6, storage=url, study_name="t", method="rtn",
                       formats=("int8", "int4:g32", "int2:g32"))
    report = mp.compress(model, target, calib=calib, eval=task, latency_repeats=1)
    study = report.steps[0]["study"]
    assert study["n_trials"] == 6 and study["sampler"] == ("tpe" if search == "optuna" else "random")
    chosen = study["chosen"]
    assert chosen["nbytes"] <= report.steps[0]["budget_bytes"]
    assert report.size["compressed_bytes"] == chosen["nbytes"]  # the chosen trial, applied again
    assert report.metrics["accuracy"]["compressed"] == pytest.approx(chosen["value"])
    assert all(t["nbytes"] > chosen["nbytes"] or t["value"] <= chosen["value"] or t["nbytes"] > study["budget"]
               for t in study["trials"])
    if search == "optuna":  # the knapsack plans are the first trials
        assert [t["origin"] for t in study["trials"][:3]] == ["seed"] * 3
    if storage:  # the trials are in the SQLite file: a second run (another machine) adds to the same study
        loaded = optuna.load_study(study_name="t", storage=url)
        assert len(loaded.trials) == 6
        model2, task2, calib2 = _toy()
        mp.compress(model2, mp.Target(ratio=5, search=search, trials=2, storage=url, study_name="t", method="rtn",
                                      formats=("int8", "int4:g32", "int2:g32")), calib=calib2, eval=task2,
                    latency_repeats=1)
        assert len(optuna.load_study(study_name="t", storage=url).trials) == 8
    assert "<h3>Study</h3>" in report.to_html()


def test_pareto_front_and_redaction():
    trials = [{"number": i, "nbytes": b, "value": v} for i, (b, v) in enumerate(
        [(10, 0.9), (20, 0.95), (15, 0.85), (30, 0.95), (25, 0.97)])]
    assert [t["number"] for t in pareto_front(trials, lower_is_better=False)] == [0, 1, 4]
    assert [t["number"] for t in pareto_front(trials, lower_is_better=True)] == [0, 2]
    assert redact("postgresql://me:secret@db:5432/x") == "postgresql://me:***@db:5432/x"
    assert redact(None) == "in-memory"
