"""The `modelpress` command on bad input and faults: one line on stderr in the command's words, exit 1 (2 for
usage), checked before the long work, and no input ever deleted or changed."""
import json
import importlib.util
import os
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import modelpress as mp
import modelpress.io.atomic as atomic
import modelpress.quantize as mpq
from modelpress.cli import main

FACTORY = '''
import os, signal
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))


def bare():
    return nn.Linear(8, 8)


def boom():
    raise RuntimeError("factory exploded")


def terminated():
    os.kill(os.getpid(), signal.SIGTERM)
    return build()
'''


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """A project folder holding `cwdmods.py`, as the current folder, and NOT on sys.path (as for the installed
    `modelpress` script, unlike `python -m`)."""
    (tmp_path / "cwdmods.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path), ".")])
    monkeypatch.delitem(sys.modules, "cwdmods", raising=False)
    yield tmp_path
    sys.modules.pop("cwdmods", None)


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def fails(capsys, *argv, match, rc=1):
    """The command fails with exit `rc` and exactly one line on stderr matching `match`."""
    code, _, err = run(capsys, *argv)
    assert code == rc, err
    assert len(err.strip().splitlines()) == 1, err
    assert __import__("re").search(match, err), err
    return err


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if quantization starts: the error must come before the long work."""
    def forbidden(*a, **k):
        raise AssertionError("quantize_ ran before the error was found")

    monkeypatch.setattr(mpq, "quantize_", forbidden)
    monkeypatch.setattr(mp, "quantize_", forbidden)


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_factory_found_in_the_current_folder(cwd, capsys):
    assert run(capsys, "quantize", "cwdmods:build", "--weights", "int8", "--out", "o", "--quiet")[0] == 0
    assert (cwd / "o" / "modelpress.json").is_file()


@pytest.mark.parametrize("argv, match", [
    (["cwdmods:boom"], r"MODEL factory cwdmods:boom raised RuntimeError: factory exploded"),
    (["cwdmods:bare"], r"MODEL cwdmods:bare is a bare Linear: .*nn.Sequential"),
    (["cwdmods:build", "--include", "nothing*"], r"--include nothing\* matches no layer of MODEL"),
    (["cwdmods:build", "--method", "gptq"], r"--method gptq needs calibration data: pass --calib FILE"),
    (["cwdmods:build", "--activations", "int8:static"], r"--activations int8:static needs calibration data"),
    (["cwdmods:build", "--weights", "int4:g32:g64"], r"format spec 'int4:g32:g64' sets the granularity twice"),
    (["cwdmods:build", "--out", ".", "--overwrite"], r"--out \. contains MODEL's module"),
    (["zoo:digits-cnn", "--out", ".", "--overwrite"], r"--out \.: .* is the current folder or contains it"),
    (["zoo:digits-cnn", "--out", "..", "--overwrite"], r"--out \.\.: .* is the current folder or contains it"),
    (["zoo:digits-cnn", "--state-dict", "w.safetensors"], r"--state-dict applies to package.module:factory models"),
])
def test_quantize_errors_before_work(cwd, capsys, no_work, argv, match):
    argv = ["quantize", *argv]
    if "--weights" not in argv:
        argv += ["--weights", "int8"]
    if "--out" not in argv:
        argv += ["--out", "o"]
    before = snapshot(cwd)
    fails(capsys, *argv, match=match)
    assert snapshot(cwd) == before


@pytest.mark.parametrize("make_calib, match", [
    (lambda p: save_file({"a": torch.randn(4, 32)}, str(p)),
     r": its first batch \(float32 \[4, 32\]\) does not run through the model \(RuntimeError: .*shapes cannot be"),
    (lambda p: save_file({"a": torch.randint(0, 5, (4, 64))}, str(p)),
     r": its first batch \(int64 \[4, 64\]\) does not run through the model \(RuntimeError: .*dtype"),
    (lambda p: p.write_bytes(b"garbage" * 10), r" is not a readable safetensors file"),
    (lambda p: p.mkdir(), r" is a folder; give a .safetensors file"),
    (lambda p: save_file({}, str(p)), r" holds no tensors"),
    (lambda p: save_file({"a": torch.full((4, 64), float("nan"))}, str(p)), r": tensor 'a' holds NaN or infinite"),
])
def test_bad_calib_file(cwd, capsys, no_work, make_calib, match):
    """A wrong --calib gave a 52-line traceback from inside GPTQ."""
    make_calib(cwd / "c.safetensors")
    for method in ("gptq", "awq"):
        fails(capsys, "quantize", "cwdmods:build", "--weights", "int8", "--method", method, "--calib", "c.safetensors",
              "--out", "o", match=r"error: --calib c\.safetensors" + match)
    assert not (cwd / "o").exists()


def test_int32_state_dict_is_refused_not_zeroed(cwd, capsys, no_work):
    """load_state_dict copied int32 values into the float weights (all zero for small weights), exit 0."""
    sd = {k: (v * 0).to(torch.int32) if k.endswith("weight") else v for k, v in
          nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)).state_dict().items()}
    save_file(sd, "w.safetensors")
    fails(capsys, "quantize", "cwdmods:build", "--weights", "int8", "--state-dict", "w.safetensors", "--out", "o",
          match=r"--state-dict w.safetensors: tensor '0.weight' is int32 but cwdmods:build has float32 there")


def test_unwritable_out_is_found_before_work(cwd, capsys, no_work, monkeypatch):
    monkeypatch.setattr(atomic, "writable", lambda d, probe=None: False)
    fails(capsys, "quantize", "cwdmods:build", "--weights", "int8", "--out", "a/b",
          match=r"--out a/b: cannot save to .* is not writable")


def test_out_on_a_read_only_mount_for_real(cwd, capsys, no_work):
    if not os.path.isdir("/sys") or atomic.writable(atomic.real("/sys"), ".probe-"):
        pytest.skip("needs a folder nobody can write into")
    fails(capsys, "quantize", "cwdmods:build", "--weights", "int8", "--out", "/sys/modelpress-out",
          match=r"--out /sys/modelpress-out: cannot save")


def test_disk_full_is_one_line(cwd, capsys, monkeypatch):
    from safetensors import SafetensorError

    import modelpress.io.writer as writer

    def full(*a, **k):
        raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    monkeypatch.setattr(writer, "save_file", full)
    fails(capsys, "quantize", "cwdmods:build", "--weights", "int8", "--out", "o", "--quiet",
          match=r"cannot write .*No space left on device")
    assert sorted(p.name for p in cwd.iterdir()) == ["cwdmods.py"]


@pytest.mark.parametrize("what, where", [("model", "is"), ("model", "contains"), ("model", "inside"),
                                         ("state_dict", "is"), ("state_dict", "contains"), ("calib", "is"),
                                         ("calib", "contains")])
def test_overwrite_never_deletes_an_input(cwd, capsys, no_work, what, where):
    """`quantize hf --out hf --overwrite` deleted the original weights and config.json."""
    inputs = cwd / "in"
    inputs.mkdir()
    save_file({k: v.contiguous() for k, v in nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
               .state_dict().items()}, str(inputs / "w.safetensors"))
    save_file({"a": torch.randn(4, 64)}, str(inputs / "c.safetensors"))
    if what == "model":
        from transformers import LlamaConfig, LlamaForCausalLM

        LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1, vocab_size=32)).save_pretrained(inputs / "hf")
        argv, path = ["quantize", "in/hf", "--weights", "int8"], inputs / "hf"
    else:
        flag, f = ("--state-dict", "w.safetensors") if what == "state_dict" else ("--calib", "c.safetensors")
        argv, path = ["quantize", "cwdmods:build", "--weights", "int8", flag, f"in/{f}"], inputs / f
    out = {"is": path, "contains": inputs, "inside": path / "sub"}[where]
    before = snapshot(cwd)
    capsys.readouterr()
    rel = {"is": "is", "contains": "contains", "inside": "lies inside"}[where]
    fails(capsys, *argv, "--out", os.path.relpath(out), "--overwrite", match=rf"--out .* {rel} ")
    assert snapshot(cwd) == before


def test_compress_errors_before_work(cwd, capsys, monkeypatch):
    import modelpress.pipeline as pipeline

    monkeypatch.setattr(pipeline, "compress", lambda *a, **k: pytest.fail("compress ran before the error"))
    (cwd / "r.yaml").write_text("steps:\n  - quantize: {weights: int8, overrides: [a, b]}\n")
    fails(capsys, "compress", "cwdmods:build", "--recipe", "r.yaml", "--out", "o",
          match=r"option 'overrides' of recipe step 'quantize' must be a mapping or null, got \['a', 'b'\]")
    (cwd / "g.yaml").write_text("steps:\n  - quantize: {weights: int4, method: gptq}\n")
    fails(capsys, "compress", "cwdmods:build", "--recipe", "g.yaml", "--out", "o",
          match=r"recipe g.yaml: step 1 \(quantize, method gptq.*\) needs calibration data: pass --calib FILE")
    fails(capsys, "compress", "cwdmods:build", "--recipe", "g.yaml", "--out", "g.yaml", "--overwrite",
          match=r"--out g.yaml is --recipe")
    pytest.importorskip("mlflow")
    if importlib.util.find_spec("sqlalchemy") is None:  # with it (optuna brings it), the sqlite store works
        fails(capsys, "compress", "cwdmods:build", "--recipe", "w8", "--out", "o", "--mlflow", "sqlite:///x.db",
              match=r"--mlflow sqlite:///x.db: a database tracking store needs the full MLflow package")
    fails(capsys, "compress", "cwdmods:build", "--recipe", "w8", "--out", "o", "--mlflow", "foo://x",
          match=r"--mlflow foo://x: MLflow cannot use this tracking URI")
    assert sorted(p.name for p in cwd.iterdir()) == ["cwdmods.py", "g.yaml", "r.yaml"]


def test_hugging_face_folder_errors(cwd, capsys, no_work):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=32)).save_pretrained("hf")
    capsys.readouterr()
    (cwd / "hf" / "model.safetensors").rename(cwd / "weights.bak")
    fails(capsys, "quantize", "hf", "--weights", "int8", "--out", "o",
          match=r"Hugging Face folder hf has a config.json but no weights")
    (cwd / "weights.bak").rename(cwd / "hf" / "model.safetensors")
    (cwd / "hf" / "config.json").write_text("{not json")
    fails(capsys, "quantize", "hf", "--weights", "int8", "--out", "o", match=r"cannot read hf/config.json")


@pytest.fixture
def saved(cwd):
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
    mp.quantize_(m, "int8")
    return mp.save(m, cwd / "q")


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.pop("tensors"), r"'tensors' is missing"),
    (lambda m: m.pop("layers"), r"'layers' is missing"),
    (lambda m: m["tensors"].update(file="/etc/passwd"), r"'tensors.file' must name a file inside the folder"),
    (lambda m: m["layers"]["0"].update(weights="fp8_e4m3"), r"layer '0' is .* in the manifest but the tensor file"),
])
def test_inspect_bad_manifest(saved, capsys, edit, match):
    m = json.loads((saved / "modelpress.json").read_text())
    edit(m)
    (saved / "modelpress.json").write_text(json.dumps(m))
    fails(capsys, "inspect", "q", match=match)


def test_inspect_truncated_or_absurd_header(saved, capsys):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-10])
    fails(capsys, "inspect", "q", match=r"truncated")
    import hashlib

    bad = (10**12).to_bytes(8, "little") + data[8:]
    f.write_bytes(bad)
    m = json.loads((saved / "modelpress.json").read_text())
    m["tensors"]["sha256"] = hashlib.sha256(bad).hexdigest()
    (saved / "modelpress.json").write_text(json.dumps(m))
    fails(capsys, "inspect", "q", match=r"corrupt safetensors header: it claims 1000000000000 bytes")


def test_unexpected_errors_are_one_line_with_a_hint(cwd, capsys, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("something\nwent\nwrong")

    monkeypatch.setattr(mp, "inspect_saved", broken)
    monkeypatch.delenv("MODELPRESS_TRACEBACK", raising=False)
    fails(capsys, "quantize", "cwdmods:build", "--weights", "int8", "--out", "o", "--quiet",
          match=r"error: RuntimeError: something \(set MODELPRESS_TRACEBACK=1 for the traceback\)")
    monkeypatch.setenv("MODELPRESS_TRACEBACK", "1")
    with pytest.raises(RuntimeError):
        main(["quantize", "cwdmods:build", "--weights", "int8", "--out", "o2", "--quiet"])


def test_warnings_are_one_line(cwd, capsys):
    (cwd / "m2.py").write_text("import torch\nfrom torch import nn\n\ndef build():\n"
                               "    return nn.Sequential(nn.Linear(8, 8), nn.ConvTranspose2d(2, 2, 3))\n")
    rc, _, err = run(capsys, "quantize", "m2:build", "--weights", "int8", "--out", "o", "--quiet")
    assert rc == 0 and err.strip() == ("modelpress: warning: 1 layer(s) stay float: 1 (ConvTranspose2d is not a "
                                       "supported layer type)")


def test_sigterm_is_an_interrupt(cwd, capsys):
    rc, _, err = run(capsys, "quantize", "cwdmods:terminated", "--weights", "int8", "--out", "o")
    assert rc == 143 and "terminated" in err and not (cwd / "o").exists()  # 128 + SIGTERM, as shells report it


@pytest.mark.parametrize("argv", [["quantize", "x"], ["inspect"], ["nope"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


def test_unused_calib_is_said(cwd, capsys):
    save_file({"a": torch.randn(4, 64)}, "c.safetensors")
    rc, _, err = run(capsys, "quantize", "cwdmods:build", "--weights", "int8", "--calib", "c.safetensors",
                     "--out", "o", "--quiet")
    assert rc == 0 and err.strip() == ("modelpress: warning: --calib c.safetensors is not used: --method rtn without "
                                       "static activations needs no calibration data")


def test_calibration_batches_are_read_in_numeric_key_order(tmp_path):
    from modelpress.cli_inputs import read_calib

    save_file({f"b{i}": torch.full((1, 2), float(i)) for i in (10, 2, 1)}, str(tmp_path / "c.safetensors"))
    assert [int(t[0, 0]) for t in read_calib(str(tmp_path / "c.safetensors"))] == [1, 2, 10]


def test_calibration_batches_of_several_inputs(tmp_path):
    """BATCH.NAME tensors form one batch: keyword inputs, or positional ones numbered 0, 1 ...; batches in numeric
    order of BATCH."""
    from modelpress.cli_inputs import read_calib

    f = str(tmp_path / "c.safetensors")
    ids, mask = torch.ones(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long)
    save_file({"b10.input_ids": ids + 10, "b2.input_ids": ids + 2, "b2.attention_mask": mask,
               "b10.attention_mask": mask.clone()}, f)
    batches = read_calib(f)
    assert [sorted(b) for b in batches] == [["attention_mask", "input_ids"]] * 2
    assert [int(b["input_ids"][0, 0]) for b in batches] == [3, 11]
    save_file({"b0.1": torch.full((3,), 1.0), "b0.0": torch.zeros(3, 2), "b1.0": torch.ones(3, 2),
               "b1.1": torch.ones(3)}, f)
    first = read_calib(f)[0]
    assert isinstance(first, tuple) and [t.shape for t in first] == [(3, 2), (3,)]


@pytest.mark.parametrize("tensors, match", [
    ({"b0": torch.ones(2), "b0.x": torch.ones(2)}, r"batch 'b0' is both one tensor and b0.INPUT parts"),
    ({"b0.0": torch.ones(2), "b0.x": torch.ones(2)}, r"batch 'b0' mixes positional parts"),
    ({"b0.0": torch.ones(2), "b0.2": torch.ones(2)}, r"batch 'b0' has positional parts \[0, 2\]; number them"),
    ({"b0.": torch.ones(2)}, r"tensor 'b0\.': name the parts of a batch BATCH.INPUT"),
])
def test_bad_calibration_batch_names(tmp_path, tensors, match):
    from modelpress.cli_inputs import CLIError, read_calib

    save_file(tensors, str(tmp_path / "c.safetensors"))
    with pytest.raises(CLIError, match=match):
        read_calib(str(tmp_path / "c.safetensors"))


def test_an_encoder_decoder_is_calibrated_from_keyword_batches(tmp_path, capsys, monkeypatch):
    """A Hugging Face T5 folder needs the decoder's inputs too: --calib with b0.input_ids, b0.decoder_input_ids
    (and the attention mask) calibrates static activation ranges through the CLI."""
    import transformers

    monkeypatch.chdir(tmp_path)
    cfg = transformers.T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
                                decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(cfg).eval().save_pretrained("t5")
    g = torch.Generator().manual_seed(0)
    batches = {}
    for i in range(2):
        batches[f"b{i}.input_ids"] = torch.randint(1, 64, (2, 6), generator=g)
        batches[f"b{i}.decoder_input_ids"] = torch.randint(1, 64, (2, 6), generator=g)
        batches[f"b{i}.attention_mask"] = torch.ones(2, 6, dtype=torch.long)
    save_file(batches, "c.safetensors")
    rc, _, err = run(capsys, "quantize", "t5", "--weights", "int8", "--activations", "int8:static", "--calib",
                     "c.safetensors", "--out", "o", "--quiet")
    assert rc == 0, err
    import modelpress as mp

    q = mp.load("o")
    assert any(float(getattr(m, "input_scale", 0)) > 0 for m in q.modules())  # ranges taken from the batches


def test_out_never_holds_what_a_command_reads_or_keeps(cwd, capsys, no_work, monkeypatch):
    """--overwrite could have deleted: a study's database being resumed (compress --storage), the package of
    export's --model factory, the zoo and kernel caches (export). Each is refused before any work."""
    monkeypatch.setenv("MODELPRESS_CACHE", str(cwd / "cache"))
    (cwd / "cache" / "kernels").mkdir(parents=True)
    (cwd / "runs").mkdir()
    (cwd / "runs" / "study.db").write_bytes(b"x")
    (cwd / "pkg" / "sub").mkdir(parents=True)
    (cwd / "pkg" / "__init__.py").write_text("")
    (cwd / "pkg" / "sub" / "__init__.py").write_text("")
    (cwd / "pkg" / "models.py").write_text(FACTORY)
    before = snapshot(cwd)
    fails(capsys, "compress", "cwdmods:build", "--target-ratio", "4", "--search", "optuna", "--storage",
          f"sqlite:///{cwd / 'runs' / 'study.db'}", "--out", "runs", "--overwrite",
          match=r"--out runs contains --storage")
    fails(capsys, "quantize", "pkg.models:build", "--weights", "int8", "--out", "pkg/sub", "--overwrite",
          match=r"--out pkg/sub lies inside MODEL's package")  # (an existing subpackage; a new folder there is fine)
    for out, what in (("cache", "contains the zoo cache"), ("cache/kernels", "is the kernel cache"),
                      ("cache/zoo", "is the zoo cache")):
        fails(capsys, "export", "runs", "--format", "onnx", "--out", out, "--overwrite", match=f"--out {out} {what}")
    fails(capsys, "export", "runs", "--format", "onnx", "--model", "pkg.models:build", "--out", "pkg", "--overwrite",
          match=r"--out pkg (is|contains) MODEL's")
    (cwd / "r.yaml").write_text("steps:\n  - train: {steps: 2, checkpoint: o/train.ckpt}\n")
    before["r.yaml"] = (cwd / "r.yaml").read_bytes()
    fails(capsys, "compress", "cwdmods:build", "--recipe", "r.yaml", "--out", "o",  # (the save would find it)
          match=r"--out o contains a train step's checkpoint")
    assert snapshot(cwd) == before


def test_a_closed_pipe_ends_quietly(capsys, monkeypatch):
    import modelpress.cli as cli

    def reader_gone(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_quiet_stdout", lambda: None)  # (pytest's captured stdout stays as it is)
    monkeypatch.setattr(cli, "cmd_inspect", reader_gone)
    monkeypatch.setattr(cli, "_stdout_closed", lambda: True)
    assert main(["inspect", "x"]) == 141 and capsys.readouterr().err == ""
    monkeypatch.setattr(cli, "_stdout_closed", lambda: False)  # another pipe broke (a socket): an error, said
    assert main(["inspect", "x"]) == 1 and "Broken pipe" in capsys.readouterr().err


def test_a_new_folder_inside_the_package_is_allowed(cwd, capsys):
    """What the --out rules still allow: a new folder inside the factory's package (nothing there is replaced)."""
    (cwd / "pkg").mkdir()
    (cwd / "pkg" / "__init__.py").write_text("")
    (cwd / "pkg" / "models.py").write_text(FACTORY)
    rc, _, err = run(capsys, "quantize", "pkg.models:build", "--weights", "int8", "--out", "pkg/outputs/q", "--quiet")
    assert rc == 0 and (cwd / "pkg" / "outputs" / "q" / "modelpress.json").is_file(), err
