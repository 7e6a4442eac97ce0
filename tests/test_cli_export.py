"""`modelpress export`: saved folders that rebuild themselves (Hugging Face folders, zoo sources) to
compressed-tensors and ONNX; folders that cannot are refused with a one-line error."""
import json
import sys
import warnings

import pytest
import torch

import modelpress as mp
from modelpress.cli import main

transformers = pytest.importorskip("transformers")


@pytest.fixture
def hf_saved(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    src = tmp_path / "src"
    transformers.LlamaForCausalLM(cfg).save_pretrained(src)
    out = tmp_path / "q"
    assert main(["quantize", str(src), "--weights", "int4:g32", "--exclude", "lm_head", "--exclude", "re:.*embed.*",
                 "--out", str(out), "--quiet"]) == 0
    return out


def test_hf_folder_to_compressed_tensors_and_onnx(hf_saved, tmp_path, capsys):
    pytest.importorskip("compressed_tensors")
    pytest.importorskip("onnxruntime")
    ids = torch.randint(0, 128, (2, 10))
    ref = mp.set_kernels(mp.load(hf_saved), False)(ids).logits
    capsys.readouterr()
    assert main(["export", str(hf_saved), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()
    assert torch.allclose(back(ids).logits, ref, atol=1e-4)
    capsys.readouterr()
    assert main(["export", str(hf_saved), "--format", "onnx", "--out", str(tmp_path / "onnx"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["parity"]["cosine"] >= 0.999 and (tmp_path / "onnx" / "model.onnx").is_file()


def test_zoo_source_rebuilds_and_plain_saves_are_refused(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("MODELPRESS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "w8a8"
    assert main(["compress", "zoo:digits-cnn", "--tiny", "--recipe", "w8a8", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["export", str(out), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    assert "top-1 agreement" in capsys.readouterr().out
    p = json.loads((tmp_path / "onnx" / "parity.json").read_text())
    assert p["top1_agreement"] >= 0.995
    plain = tmp_path / "plain"
    mp.save(mp.quantize_(torch.nn.Sequential(torch.nn.Linear(8, 4)), "int8"), plain)
    assert main(["export", str(plain), "--format", "onnx", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "rebuild its float model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_a_factory_named_in_the_folder_is_not_imported(tmp_path, monkeypatch, capsys):
    """The folder's metadata names `package.module:factory`: importing it on the file's word would run code a
    file chose. Only a --model given on the command line is imported."""
    pytest.importorskip("onnxruntime")
    (tmp_path / "exfactory.py").write_text("import torch\n\ndef build():\n    torch.manual_seed(0)\n"
                                           "    return torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), "
                                           "torch.nn.Linear(8, 4))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "exfactory", raising=False)
    assert main(["quantize", "exfactory:build", "--weights", "int8", "--out", "q", "--quiet"]) == 0
    sys.modules.pop("exfactory")
    capsys.readouterr()
    assert main(["export", "q", "--format", "onnx", "--out", "x"]) == 1
    err = capsys.readouterr().err
    assert "was made from exfactory:build; modelpress does not import code that a file names" in err
    assert "exfactory" not in sys.modules and not (tmp_path / "x").exists()
    from safetensors.torch import save_file

    save_file({"x": torch.randn(2, 16)}, str(tmp_path / "in.safetensors"))
    assert main(["export", "q", "--format", "onnx", "--out", "x", "--model", "exfactory:build",
                 "--inputs", "in.safetensors"]) == 0
    assert (tmp_path / "x" / "model.onnx").is_file()
    sys.modules.pop("exfactory", None)


def test_encoder_decoders_get_decoder_tokens_as_example_inputs():
    """Without --inputs a Hugging Face model gets random token ids; an encoder-decoder (T5) also needs the decoder's."""
    transformers = pytest.importorskip("transformers")
    from modelpress.cli_export import _hf_inputs

    cfg = transformers.T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
                                decoder_start_token_id=0)
    t5 = transformers.T5ForConditionalGeneration(cfg).eval()
    feeds = _hf_inputs(t5)
    assert set(feeds) == {"input_ids", "attention_mask", "decoder_input_ids"} and int(feeds["input_ids"].max()) < 64
    with torch.no_grad():
        t5(**feeds)  # runs as given
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64))
    assert set(_hf_inputs(gpt2)) == {"input_ids", "attention_mask"}


def test_export_inputs_and_thresholds_are_checked(tmp_path, capsys):
    from safetensors.torch import save_file

    from modelpress.cli_export import read_inputs

    bad = {"garbage": lambda p: p.write_bytes(b"x" * 20),
           "empty": lambda p: save_file({"x": torch.zeros(0, 4)}, str(p)),
           "nan": lambda p: save_file({"x": torch.full((2, 4), float("nan"))}, str(p))}
    for name, make in bad.items():
        make(tmp_path / f"{name}.safetensors")
        with pytest.raises(Exception, match=r"--inputs .*(not a readable safetensors|is empty|NaN)"):
            read_inputs(str(tmp_path / f"{name}.safetensors"))
    for flag, value in (("--min-cosine", "nan"), ("--min-cosine", "1.5"), ("--min-top1", "-3")):
        with pytest.raises(SystemExit) as e:
            main(["export", str(tmp_path), "--format", "onnx", "--out", str(tmp_path / "o"), flag, value])
        assert e.value.code == 2 and f"{flag} must be a number in" in capsys.readouterr().err
