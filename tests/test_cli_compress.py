import json
import sys

import pytest

from modelpress.cli import main

FACTORY = """
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
"""


@pytest.fixture
def factory(tmp_path, monkeypatch):
    (tmp_path / "toyfactory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "toyfactory:make"
    sys.modules.pop("toyfactory", None)


def test_compress_json_schema(factory, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compress", factory, "--recipe", "w4-g32", "--out", str(out), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert {"metrics", "size", "latency", "layers", "recipe", "seconds"} <= set(d)
    assert d["size"]["ratio"] > 4
    assert (out / "report.json").is_file() and (out / "report.html").is_file()
    assert (out / "modelpress.json").is_file() and (out / "model.safetensors").is_file()


def test_compress_refuses_non_empty_out(factory, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["compress", factory, "--recipe", "w8", "--out", str(out)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert main(["compress", factory, "--recipe", "w8", "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert not (out / "keep.txt").exists()


def test_compress_bad_recipe_fails_before_work(factory, tmp_path, capsys):
    assert main(["compress", factory, "--recipe", "w5", "--out", str(tmp_path / "o")]) == 1
    assert "unknown recipe 'w5'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_compress_help_lists_every_builtin_recipe(capsys, monkeypatch):
    from modelpress.recipe import BUILTIN_RECIPES

    monkeypatch.setenv("COLUMNS", "1000")  # one line per option: no wrapping inside names
    with pytest.raises(SystemExit) as e:
        main(["compress", "--help"])
    assert e.value.code == 0
    assert f"built-in recipe ({', '.join(BUILTIN_RECIPES)}) or a YAML file" in capsys.readouterr().out
    assert {"sparse-2:4-w4", "prune-channels-50"} <= set(BUILTIN_RECIPES)


def test_compress_mlflow_without_package_is_clear(factory, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import fails
    assert main(["compress", factory, "--recipe", "w8", "--out", str(tmp_path / "o"), "--mlflow"]) == 1
    assert "pip install 'modelpress[mlflow]'" in capsys.readouterr().err


def test_compress_logs_to_mlflow_file_store(factory, tmp_path, capsys):
    pytest.importorskip("mlflow")
    out = tmp_path / "out"
    assert main(["compress", factory, "--recipe", "w8", "--out", str(out), "--mlflow", "--quiet"]) == 0
    runs = list((out / "mlruns").glob("*/*/metrics/size_ratio"))
    assert len(runs) == 1
    ratio = float(runs[0].read_text().split()[1])
    assert ratio == pytest.approx(json.loads((out / "report.json").read_text())["size"]["ratio"])
    assert list((out / "mlruns").glob("*/*/artifacts/report.html"))


def test_mlflow_default_store_reads_back_as_the_readme_says(factory, tmp_path, capsys, monkeypatch):
    """MLflow 3 refuses to open a file store unless MLFLOW_ALLOW_FILE_STORE is set (the README says so)."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out = tmp_path / "out"
    assert main(["compress", factory, "--recipe", "w8", "--out", str(out), "--mlflow", "--quiet"]) == 0
    runs = mlflow.MlflowClient(tracking_uri=str(out / "mlruns")).search_runs(
        [mlflow.MlflowClient(tracking_uri=str(out / "mlruns")).get_experiment_by_name("modelpress").experiment_id])
    assert len(runs) == 1
    ratio = json.loads((out / "report.json").read_text())["size"]["ratio"]
    assert runs[0].data.metrics["size_ratio"] == pytest.approx(ratio)


def test_a_store_named_inside_out_is_made_after_the_save(factory, tmp_path, capsys):
    """--mlflow OUT/runs: created when logging, after the model's folder is saved (the pre-check had created it,
    so the save found --out not empty after all the work)."""
    pytest.importorskip("mlflow")
    out = tmp_path / "out"
    assert main(["compress", factory, "--recipe", "w8", "--out", str(out), "--mlflow", str(out / "runs"),
                 "--quiet"]) == 0
    assert len(list((out / "runs").glob("*/*/metrics/size_ratio"))) == 1 and (out / "report.json").is_file()


def test_the_report_arrives_with_the_model_in_one_step(factory, tmp_path, capsys, monkeypatch):
    """report.json / report.html are written into the folder being saved: a failure (or an interrupt) while they are
    written leaves no --out at all, not a model folder without its report."""
    from modelpress.report import Report

    def broken(self, folder):
        raise KeyboardInterrupt

    monkeypatch.setattr(Report, "save", broken)
    out = tmp_path / "out"
    assert main(["compress", factory, "--recipe", "w8", "--out", str(out), "--quiet"]) == 130  # (interrupted)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["toyfactory.py"]
