import json

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.evaluate import ClassificationTask

REPORT_KEYS = {"metrics", "size", "latency", "layers", "recipe", "seconds"}


def _toy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    x = torch.randn(256, 32)
    with torch.no_grad():
        y = model(x).argmax(-1)  # labels the float model gets right: accuracy 1.0 for the reference
    task = ClassificationTask(data=[(x[:128], y[:128]), (x[128:], y[128:])])
    return model, task, [torch.randn(16, 32) for _ in range(2)]


def test_compress_report_schema_and_values():
    model, task, calib = _toy()
    report = mp.compress(model, "w8", calib=calib, eval=task, latency_repeats=3)
    d = json.loads(report.to_json())
    assert REPORT_KEYS <= set(d)
    for name in ("accuracy", "precision", "recall", "f1"):
        m = d["metrics"][name]
        assert set(m) == {"reference", "compressed", "delta"}
        assert m["reference"] == pytest.approx(1.0)
        assert m["delta"] == pytest.approx(m["compressed"] - m["reference"])
    for name in ("kl_divergence", "top1_agreement", "sqnr_db"):
        assert d["metrics"][name]["reference"] is None
    assert d["metrics"]["top1_agreement"]["compressed"] >= 0.95
    assert d["metrics"]["sqnr_db"]["compressed"] > 30
    s = d["size"]
    assert set(s) == {"reference_bytes", "compressed_bytes", "ratio", "reference_params", "compressed_params",
                      "sparsity", "kernel_bytes"}
    assert s["kernel_bytes"] == mp.inspect(model).kernel_bytes  # (model: now the compressed one)
    assert s["reference_bytes"] == (32 * 64 + 64 + 64 * 4 + 4) * 4
    assert s["reference_params"] == s["compressed_params"] == 32 * 64 + 64 + 64 * 4 + 4 and s["sparsity"] == 0
    assert s["ratio"] == pytest.approx(s["reference_bytes"] / s["compressed_bytes"])
    assert 3.0 < s["ratio"] < 4.0
    assert d["latency"]["reference_ms"] > 0 and d["latency"]["compressed_ms"] > 0
    assert [r["name"] for r in d["layers"]] == ["0", "2"]
    assert d["recipe"]["name"] == "w8" and d["seconds"] > 0
    assert isinstance(model[0], mp.QuantLinear)  # compressed in place


def test_compress_without_eval_notes_it():
    model, _, calib = _toy()
    report = mp.compress(model, "w4-g32", calib=calib, latency_repeats=2)
    assert report.metrics == {} and report.notes
    assert report.size["ratio"] > 4


def test_report_files(tmp_path):
    model, task, calib = _toy()
    report = mp.compress(model, "w8a8", calib=calib, eval=task, latency_repeats=2)
    j, h = report.save(tmp_path)
    assert json.loads(j.read_text())["recipe"]["name"] == "w8a8"
    page = h.read_text()
    assert "data:image/png;base64," in page  # the size-versus-quality plot
    assert "accuracy" in page and "QuantLinear" in page
    assert "accuracy" in str(report)


@pytest.mark.parametrize("mode", ["memory", "speed"])
def test_report_says_kernel_mode_and_paths(mode, tmp_path):
    """The report names the kernel mode used and, per quantized layer, the path it ran at the batch it saw."""
    model, task, calib = _toy()
    report = mp.compress(model, "fp8", calib=calib, eval=task, latency_repeats=2, kernels=mode)
    assert report.kernels["mode"] == mode and report.kernels["cpu"]
    assert mp.quant.kernel_mode(model) == mode
    rows = report.kernel_rows()
    assert {r["layer"] for r in rows} == {"0", "2"} and all(r["rows"] == 128 for r in rows)
    # fp8 (fixed rules in tests): the fp8 kernel where a native x86 build runs (the portable build puts torch's own
    # product first); else memory mode decodes natively at each call (the reference path's numbers, or the reference
    # path itself without a native build), speed mode keeps a dense copy
    paths, cpu, layer = mp.quant.kernels.paths, mp.quant.kernels.cpu_info(), model[0]
    names = [n for n in paths.LINEAR if paths.applies("linear", n, layer, cpu, 128)]
    choice = paths.static_choice("linear", names, layer, cpu, 128)
    if choice in (None, "native-decode") and mode == "speed":
        choice = "dense"
    assert {r["path"] for r in rows} == {paths.display("linear", choice, layer, cpu) if choice else "reference"}
    assert f"mode {mode}" in str(report) and "kernel mode" in str(report)
    _, h = report.save(tmp_path)
    assert f"Kernel mode {mode}" in h.read_text()
    assert json.loads(report.to_json())["layers"][0]["kernels"][0]["path"] == rows[0]["path"]


def test_report_json_is_strict_when_metrics_are_not_finite(tmp_path):
    """An unchanged model has SQNR +inf; strict JSON parsers (jq, JSON.parse) refuse NaN / Infinity tokens."""
    model, task, calib = _toy()
    report = mp.compress(model, {"steps": [{"quantize": {"weights": "fp32"}}]}, calib=calib, eval=task,
                         latency_repeats=1)
    assert report.metrics["sqnr_db"]["compressed"] == float("inf")
    report.metrics["accuracy"]["delta"] = float("nan")

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    for text in (report.to_json(), report.to_json(indent=None), report.save(tmp_path)[0].read_text()):
        d = json.loads(text, parse_constant=refuse)
        assert d["metrics"]["sqnr_db"]["compressed"] is None and d["metrics"]["accuracy"]["delta"] is None


def test_a_time_budget_must_be_positive():
    """A negative budget ran no training step and said nothing."""
    import torch
    from torch import nn

    import modelpress as mp

    m = nn.Sequential(nn.Linear(4, 2))
    for bad in (-1, 0, float("nan")):
        with pytest.raises(ValueError, match="budget_seconds must be a positive number"):
            mp.compress(m, "w8", calib=[torch.randn(2, 4)], budget_seconds=bad)


def test_the_html_report_has_what_the_table_has_and_each_steps_record(tmp_path, monkeypatch):
    """Parameters and sparsity rows, a Steps table, and a note when a step stopped early on the time budget (the
    HTML had left them out; an early stop was only in report.json)."""
    model, task, calib = _toy()
    recipe = {"steps": [{"prune_channels": {"ratio": 0.5}}, {"train": {"steps": 100000, "lr": 0.001}},
                        {"prune": {"sparsity": 0.5}}]}
    train = [(x, y) for x, y in task.data]
    report = mp.compress(model, recipe, calib=calib, eval=task, latency_repeats=2, train=train, budget_seconds=1.0)
    page = report.to_html()
    assert "<td>parameters</td>" in page and "<td>sparsity (pruned layers)</td>" in page
    assert "<h2>Steps</h2>" in page and "channels_removed" in page and "stopped_early True" in page
    assert any("stopped early on the time budget" in n for n in report.notes)


def test_the_table_colours_a_delta_by_direction_and_a_nan_delta_not_at_all():
    """Green for better, red for worse (lower is better for loss-like metrics); a NaN delta (AUC over one class)
    is neither."""
    import io

    from rich.console import Console

    from modelpress.report import Report

    nan = float("nan")
    r = Report(model="m", recipe={"name": "x"}, latency={}, layers=[], seconds=0.0,
               metrics={"accuracy": {"reference": 0.9, "compressed": 0.8, "delta": -0.1},
                        "perplexity": {"reference": 9.0, "compressed": 8.0, "delta": -1.0},
                        "auc": {"reference": nan, "compressed": nan, "delta": nan}},
               size={"reference_bytes": 1, "compressed_bytes": 1, "ratio": 1.0})
    console = Console(file=io.StringIO(), force_terminal=True, color_system="standard", width=120)
    console.print(r.table())
    rows = {line.split()[1]: line for line in console.file.getvalue().splitlines() if line.count("│") > 2}
    red, green = "\x1b[31m", "\x1b[32m"
    assert red in rows["accuracy"] and green in rows["perplexity"]
    assert red not in rows["auc"] and green not in rows["auc"] and "nan" in rows["auc"]
