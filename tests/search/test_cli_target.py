import json

import pytest

from modelpress.cli import main


def test_target_ratio_meets_the_ratio_and_writes_a_plan_that_reruns(tmp_path, capsys):
    out, again = tmp_path / "out", tmp_path / "again"
    assert main(["compress", "zoo:digits-cnn", "--tiny", "--target-ratio", "5", "--max-drop", "0.05",
                 "--out", str(out), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["size"]["ratio"] >= 5
    assert d["steps"][0]["check"]["drop"] <= 0.05
    for f in ("plan.yaml", "sensitivity.json", "report.html", "model.safetensors"):
        assert (out / f).is_file(), f
    assert main(["compress", "zoo:digits-cnn", "--tiny", "--recipe", str(out / "plan.yaml"), "--out", str(again),
                 "--json"]) == 0
    d2 = json.loads(capsys.readouterr().out)
    assert d2["size"]["compressed_bytes"] == d["size"]["compressed_bytes"]
    assert d2["metrics"]["accuracy"]["compressed"] == d["metrics"]["accuracy"]["compressed"]
    reuse = tmp_path / "reuse"  # another ratio from the saved sensitivity table: no new measurements
    assert main(["compress", "zoo:digits-cnn", "--tiny", "--target-ratio", "6", "--sensitivity",
                 str(out / "sensitivity.json"), "--out", str(reuse), "--json"]) == 0
    d3 = json.loads(capsys.readouterr().out)
    assert d3["size"]["ratio"] >= 6 and d3["steps"][0]["sensitivity"] == d["steps"][0]["sensitivity"]


def test_impossible_target_is_refused_in_one_line_with_the_closest_ratio(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compress", "zoo:digits-cnn", "--tiny", "--target-ratio", "60", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "out of reach" in err and "closest reachable ratio ÷" in err
    assert not out.exists()


@pytest.mark.parametrize("argv, message, rc", [  # flags that do not go together, values out of range: usage, 2
    (["--recipe", "w8", "--target-ratio", "4"], "not both", 2),
    ([], "give a recipe", 2),
    (["--recipe", "w8", "--max-drop", "0.01"], "--max-drop applies only with a target", 2),
    (["--recipe", "w8", "--max-drop", "0.01", "--metric", "f1"], "--max-drop, --metric apply only with a target", 2),
    (["--target-ratio", "4", "--target-bits", "3"], "one of", 2),
    (["--target-ratio", "0.5"], "ratio must be a finite number >= 1", 2),
    (["--target-ratio", "inf"], "ratio must be a finite number >= 1, got inf", 2),
    (["--target-ratio", "4", "--max-drop", "inf"], "max_drop must be a finite number >= 0, got inf", 2),
    (["--recipe", "w8", "--search", "random"], "--search applies only with a target", 2),
    (["--recipe", "w8", "--cost", "hessian"], "--cost applies only with a target", 2),
    (["--target-ratio", "4", "--metric", "f1"], "--metric applies only with --max-drop or a study", 2),
    (["--target-ratio", "4", "--max-drop", "lots"], "max_drop", 2),
    (["--target-ratio", "4", "--formats", "int4,int9"], "unknown number format", 2),
    (["--target-ratio", "4", "--sensitivity", "no-such.json"], "--sensitivity no-such.json does not exist", 1),
])
def test_bad_target_flags_fail_before_work(tmp_path, capsys, argv, message, rc):
    out = tmp_path / "out"
    assert main(["compress", "zoo:digits-cnn", "--tiny", *argv, "--out", str(out)]) == rc
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--trials", "5"], "--trials only applies to a study: add --search optuna (or random)"),
    (["--search", "allocate", "--trials", "5"], "--trials only applies to a study: add --search optuna (or random)"),
    (["--storage", "sqlite:///x.db"], "--storage only applies to a study: add --search optuna (or random)"),
    (["--study-name", "s"], "--study-name only applies to a study: add --search optuna (or random)"),
    (["--formats", ""], "--formats needs at least one format (F,F,...), got ''"),
    (["--formats", " , "], "--formats needs at least one format (F,F,...), got ' , '"),
])
def test_flags_that_do_nothing_are_usage_errors(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["compress", "zoo:digits-cnn", "--tiny", "--target-ratio", "4", *argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"modelpress compress: error: {message}\n" in err and "usage:" in err
    assert not out.exists()


def test_tiny_applies_only_to_zoo_models(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["compress", "mypkg.models:make", "--recipe", "w8", "--tiny", "--out", str(out)])
    assert e.value.code == 2 and "--tiny applies only to zoo models (zoo:NAME)" in capsys.readouterr().err
    assert not out.exists()


def test_trials_with_a_study_and_formats_pass_the_usage_check():
    from modelpress.cli import build_parser

    for search in ("optuna", "random"):
        args = build_parser().parse_args(["compress", "m", "--target-ratio", "4", "--search", search, "--trials", "3",
                                          "--formats", "int4,", "--out", "o"])
        assert args.usage_check(args) is None and args.trials == 3


def test_a_study_records_where_its_database_ends_up_and_resumes_from_it(tmp_path, capsys):
    optuna = pytest.importorskip("optuna")
    out = tmp_path / "out"
    assert main(["compress", "zoo:ctr", "--tiny", "--target-ratio", "4", "--search", "optuna", "--trials", "2",
                 "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    study = report["steps"][0]["study"]
    url = f"sqlite:///{out.resolve() / 'study.db'}"
    assert study["storage"] == url and report["recipe"]["steps"][0]["target"]["storage"] == url
    meta = json.loads((out / "modelpress.json").read_text())
    assert "study-" not in json.dumps(meta) and "study-" not in (out / "report.html").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the temporary folder is gone
    complete = lambda: sum(t.state.name == "COMPLETE" for t in optuna.load_study(  # noqa: E731
        study_name=study["name"], storage=url).trials)
    assert complete() == study["n_trials"] == 2
    # the recorded URL resumes the study: another run adds its trial to the same database
    assert main(["compress", "zoo:ctr", "--tiny", "--target-ratio", "4", "--search", "optuna", "--trials", "1",
                 "--storage", url, "--study-name", study["name"], "--out", str(tmp_path / "again"), "--quiet"]) == 0
    assert complete() == 3
    assert json.loads((tmp_path / "again" / "report.json").read_text())["steps"][0]["study"]["n_trials"] == 3
