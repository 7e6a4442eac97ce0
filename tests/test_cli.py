"""The `modelpress` command, run in-process: quantize a factory model (with .safetensors / .pt weights), inspect,
exit codes (0 ok, 1 error with a message on stderr, 2 usage) and files left untouched on errors."""
import json
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import modelpress as mp
from modelpress.cli import main

FACTORY = '''
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))


def not_a_factory():
    return 3
'''


def build(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))


@pytest.fixture
def factory(tmp_path, monkeypatch):
    pkg = tmp_path / "mp_cli_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("mp_cli_pkg", "mp_cli_pkg.models"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return "mp_cli_pkg.models:build"


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def expected_output(model, spec, x):
    mp.quantize_(model, mp.QuantConfig(weights=spec))
    with torch.no_grad():
        return model(x)


def test_quantize_json(factory, tmp_path, capsys):
    out_dir = tmp_path / "out"
    rc, out, err = run(capsys, "quantize", factory, "--weights", "int4:g32", "--out", str(out_dir), "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["out"] == str(out_dir) and d["config"]["weights"] == "int4:g32"
    assert d["total_bytes"] == mp.inspect_saved(out_dir).total_bytes
    layers = {r["name"]: r for r in d["layers"]}
    assert layers["0"]["format"] == "int4:g32" and layers["0"]["params"] == 64 * 64 + 64
    assert layers["0"]["bytes"] == 64 * 64 // 2 + 64 * 2 * 2 + 64 * 4  # codes + bf16 scales + fp32 bias
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    loaded = mp.load(out_dir, build(seed=5))
    with torch.no_grad():
        assert torch.equal(loaded(x), expected_output(build(), "int4:g32", x))
    manifest = json.loads((out_dir / "modelpress.json").read_text())
    assert manifest["metadata"]["source"] == factory


def test_quantize_table_with_progress(factory, tmp_path, capsys):
    rc, out, err = run(capsys, "quantize", factory, "--weights", "int8", "--exclude", "2", "--out", str(tmp_path / "o"))
    assert rc == 0, err
    assert "QuantLinear" in out and f"saved to {tmp_path / 'o'}" in out
    assert {r.name: r.format for r in mp.inspect_saved(tmp_path / "o").rows}["0"] == "int8"
    assert {r.name: r.type for r in mp.inspect_saved(tmp_path / "o").rows}["2"] == "float"


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_quantize_with_state_dict(suffix, factory, tmp_path, capsys):
    trained = build(seed=42)
    sd_file = tmp_path / f"weights{suffix}"
    if suffix == ".pt":
        torch.save(trained.state_dict(), sd_file)
    else:
        save_file(trained.state_dict(), str(sd_file))
    rc, out, err = run(capsys, "quantize", factory, "--weights", "int8", "--state-dict", str(sd_file),
                       "--out", str(tmp_path / "o"), "--quiet")
    assert rc == 0, err
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(mp.load(tmp_path / "o", build())(x), expected_output(build(seed=42), "int8", x))


class Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_state_dict_pt_is_never_unpickled(factory, tmp_path, capsys):
    bad = tmp_path / "evil.pt"
    torch.save({"0.weight": Evil()}, bad)
    rc, out, err = run(capsys, "quantize", factory, "--weights", "int8", "--state-dict", str(bad),
                       "--out", str(tmp_path / "o"), "--quiet")
    assert rc == 1 and "unpickled!" not in out
    assert err.startswith("modelpress: error:") and "evil.pt" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content, match", [
    ({"0.weight": torch.zeros(64, 64)}, "Missing key"),
    ({"0.weight": torch.zeros(3, 3), "0.bias": torch.zeros(64), "2.weight": torch.zeros(16, 64),
      "2.bias": torch.zeros(16)}, "size mismatch"),
])
def test_state_dict_that_does_not_fit(content, match, factory, tmp_path, capsys):
    f = tmp_path / "w.safetensors"
    save_file(content, str(f))
    rc, _, err = run(capsys, "quantize", factory, "--weights", "int8", "--state-dict", str(f),
                     "--out", str(tmp_path / "o"), "--quiet")
    assert rc == 1 and match in err and "w.safetensors" in err


def test_state_dict_file_errors(factory, tmp_path, capsys):
    rc, _, err = run(capsys, "quantize", factory, "--weights", "int8", "--state-dict", str(tmp_path / "no.pt"),
                     "--out", str(tmp_path / "o"))
    assert rc == 1 and "does not exist" in err
    (tmp_path / "w.npz").write_bytes(b"x")
    rc, _, err = run(capsys, "quantize", factory, "--weights", "int8", "--state-dict", str(tmp_path / "w.npz"),
                     "--out", str(tmp_path / "o"))
    assert rc == 1 and ".safetensors" in err
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    rc, _, err = run(capsys, "quantize", factory, "--weights", "int8", "--state-dict",
                     str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "o"))
    assert rc == 1 and "bad.safetensors" in err


def test_inspect_json_and_table(factory, tmp_path, capsys):
    assert run(capsys, "quantize", factory, "--weights", "mxfp4", "--out", str(tmp_path / "o"), "--quiet")[0] == 0
    rc, out, err = run(capsys, "inspect", str(tmp_path / "o"), "--json")
    assert rc == 0, err
    d = json.loads(out)
    manifest = json.loads((tmp_path / "o" / "modelpress.json").read_text())
    assert d["total_bytes"] == manifest["tensors"]["tensor_bytes"]
    assert d["total_params"] == 64 * 64 + 64 + 16 * 64 + 16
    assert {r["name"]: r["format"] for r in d["layers"]} == {"0": "mxfp4", "2": "mxfp4"}
    rc, out, _ = run(capsys, "inspect", str(tmp_path / "o"))
    assert rc == 0 and "mxfp4" in out and out.strip().splitlines()[-1].startswith("total")


def test_error_bad_format_spec(factory, tmp_path, capsys):
    rc, out, err = run(capsys, "quantize", factory, "--weights", "int9", "--out", str(tmp_path / "o"))
    assert rc == 1 and out == ""
    assert err.startswith("modelpress: error:") and "int9" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_error_existing_out(factory, tmp_path, capsys):
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("precious")
    rc, _, err = run(capsys, "quantize", factory, "--weights", "int8", "--out", str(out_dir))
    assert rc == 1 and "not empty" in err and "--overwrite" in err
    assert [p.name for p in out_dir.iterdir()] == ["keep.txt"] and (out_dir / "keep.txt").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    rc, _, err = run(capsys, "quantize", factory, "--weights", "int8", "--out", str(tmp_path / "file"))
    assert rc == 1 and (tmp_path / "file").read_text() == "x"
    rc, _, err = run(capsys, "quantize", factory, "--weights", "int8", "--out", str(out_dir), "--overwrite", "--quiet")
    assert rc == 0 and sorted(p.name for p in out_dir.iterdir()) == ["model.safetensors", "modelpress.json"]


def test_error_missing_folder(tmp_path, capsys):
    rc, out, err = run(capsys, "inspect", str(tmp_path / "nope"))
    assert rc == 1 and out == "" and "does not exist" in err
    (tmp_path / "empty").mkdir()
    rc, _, err = run(capsys, "inspect", str(tmp_path / "empty"))
    assert rc == 1 and "modelpress.json is missing" in err


@pytest.mark.parametrize("spec, match", [
    ("no_colon_here", "is not a folder, a zoo:NAME nor a package.module:factory"),
    ("mp_cli_pkg.nothere:build", "cannot import"),
    ("mp_cli_pkg.models:missing", "cannot import"),
    ("mp_cli_pkg.models:not_a_factory", "nn.Module"),
])
def test_error_bad_model_string(spec, match, factory, tmp_path, capsys):
    rc, _, err = run(capsys, "quantize", spec, "--weights", "int8", "--out", str(tmp_path / "o"))
    assert rc == 1 and match in err and err.startswith("modelpress: error:")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [[], ["quantize", "m:f"], ["quantize", "m:f", "--weights", "int8"],
                                  ["frobnicate"], ["inspect"], ["quantize", "m:f", "--weights", "int8", "--out", "o",
                                                                "--bogus"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["quantize", "--help"], ["inspect", "--help"], ["--version"]])
def test_help_exits_0(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "modelpress" in out or "usage:" in out
    if argv == ["quantize", "--help"]:
        assert "--weights" in out and "--state-dict" in out
