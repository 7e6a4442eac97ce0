"""Self-contained saved models: a quantized Hugging Face model's folder holds its config, generation config and
tokenizer, so `mp.load(folder)` rebuilds it bit-exactly with nothing else; transformers' own save/load refuse
modelpress layers loudly; fold_bn recipes saved by the CLI replay onto a fresh zoo model."""
import json
import os
import warnings

import pytest
import torch

import modelpress as mp
from modelpress.cli import main

transformers = pytest.importorskip("transformers")


def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(127)} | {"[UNK]": 127}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")


@pytest.fixture
def hf_folder(tmp_path):
    src = tmp_path / "src"
    tiny_llama().save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    return src


def quantized(model, weights="int4:g32"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mp.quantize_(model, mp.QuantConfig(weights=weights, exclude=["lm_head"]))


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("weights", ["int4:g32", "int8"])
def test_load_with_nothing_else_is_bit_exact_and_brings_the_tokenizer(hf_folder, tmp_path, weights):
    m = quantized(transformers.AutoModelForCausalLM.from_pretrained(hf_folder).eval(), weights)
    ref = m(IDS).logits
    mp.save(m, tmp_path / "q", tokenizer=hf_folder)
    files = set(os.listdir(tmp_path / "q"))
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    loaded = mp.load(tmp_path / "q")
    assert type(loaded).__name__ == "LlamaForCausalLM" and torch.equal(loaded(IDS).logits, ref)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "q")
    assert tok("w1 w5 w9")["input_ids"] == [1, 5, 9]


def test_adaround_biases_on_bias_free_projections_reload_with_nothing_else(tmp_path):
    # bias correction gives Llama's bias-free projections a bias: load(folder) rebuilds them bit-exactly
    from modelpress.algorithms.adaround import Config

    m = tiny_llama()
    calib = [torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    mp.quantize_(m, mp.QuantConfig(weights="int4:g32", exclude=["lm_head"]), calib=calib,
                 method=Config(iters=0, n_samples=16))
    assert m.model.layers[0].self_attn.q_proj.bias is not None
    mp.save(m, tmp_path / "q")
    assert torch.equal(mp.load(tmp_path / "q")(IDS).logits, m(IDS).logits)


def test_tokenizer_object_and_bad_tokenizer_arguments(tmp_path):
    m = quantized(tiny_llama())
    mp.save(m, tmp_path / "q", tokenizer=tiny_tokenizer())
    assert (tmp_path / "q" / "tokenizer.json").is_file()
    with pytest.raises(ValueError, match="does not exist"):
        mp.save(m, tmp_path / "q2", tokenizer=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no tokenizer files"):
        mp.save(m, tmp_path / "q3", tokenizer=tmp_path / "empty")
    with pytest.raises(ValueError, match="Hugging Face"):
        mp.save(torch.nn.Sequential(torch.nn.Linear(4, 4)), tmp_path / "q4", tokenizer=tiny_tokenizer())
    assert not any((tmp_path / n).exists() for n in ("q2", "q3", "q4"))


def test_plain_models_still_need_their_architecture(tmp_path):
    m = mp.quantize_(torch.nn.Sequential(torch.nn.Linear(8, 4)), "int8")
    mp.save(m, tmp_path / "q")
    with pytest.raises(ValueError, match="pass the float model"):
        mp.load(tmp_path / "q")


def test_transformers_save_pretrained_refuses_and_from_pretrained_cannot_read_garbage(tmp_path):
    m = quantized(tiny_llama())
    with pytest.raises(ValueError, match="modelpress.save"):
        m.save_pretrained(tmp_path / "sp")
    assert not (tmp_path / "sp").exists()  # refused before anything was written
    mp.save(m, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["quant_method"] == "modelpress"
    with pytest.raises(OSError):  # no model.safetensors: transformers finds no weights instead of random ones
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    loaded = mp.load(tmp_path / "q")
    with pytest.raises(ValueError, match="modelpress.save"):
        loaded.save_pretrained(tmp_path / "sp")


@pytest.mark.parametrize("make", ["convert_", "prune_", "factorize_"])
def test_save_pretrained_refuses_after_every_verb_that_swaps_in_modelpress_layers(make, tmp_path):
    """convert_ after QAT (also what the Trainer callback does at the end), prune_ and the structural transforms
    swap in layers whose state transformers cannot write: save_pretrained had written a checkpoint that
    from_pretrained filled with random weights."""
    m = tiny_llama()
    if make == "convert_":
        mp.prepare_qat_(m, "int8")
        m.save_pretrained(tmp_path / "qat")  # QAT layers are float layers: their weights are written
        mp.convert_(m)
    elif make == "prune_":
        mp.prune_(m, 0.5)
    else:
        mp.factorize_(m, mp.FactorizeConfig(rank=4, include=["model.layers.0.mlp.up_proj"]))
    with pytest.raises(ValueError, match="modelpress.save"):
        m.save_pretrained(tmp_path / "sp")
    assert not (tmp_path / "sp").exists()


def test_dequantized_model_saves_with_transformers(tmp_path):
    m = mp.set_kernels(quantized(tiny_llama()), False)  # the fp32 reference path: what a float model computes
    ref = m(IDS).logits
    plain = mp.dequantize(m)
    plain.save_pretrained(tmp_path / "f")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "f").eval()
    assert torch.allclose(back(IDS).logits, ref, atol=1e-4)
    m.dequantize()  # transformers' own verb, through modelpress's quantizer
    assert type(m.model.layers[0].mlp.up_proj) is torch.nn.Linear and getattr(m, "hf_quantizer", None) is None
    assert torch.allclose(m(IDS).logits, ref, atol=1e-4)


def test_cli_quantize_of_a_folder_is_self_contained(hf_folder, tmp_path):
    out = tmp_path / "out"
    assert main(["quantize", str(hf_folder), "--weights", "int4:g32", "--exclude", "lm_head", "--out", str(out),
                 "--quiet"]) == 0
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    loaded = mp.load(out)
    assert isinstance(loaded.model.layers[0].mlp.up_proj, mp.QuantLinear)


def test_cli_fold_bn_recipe_replays_onto_a_fresh_zoo_model(tmp_path, monkeypatch):
    from modelpress import zoo

    monkeypatch.setenv("MODELPRESS_CACHE", str(tmp_path / "cache"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: fold-w8\nsteps:\n  - fold_bn: {}\n  - quantize: {weights: int8}\n")
    out = tmp_path / "out"
    assert main(["compress", "zoo:digits-cnn", "--tiny", "--recipe", str(recipe), "--out", str(out), "--quiet"]) == 0
    x = zoo.build("digits-cnn", tiny=True).calib[0]
    ref = zoo.build("digits-cnn", tiny=True).model  # the same steps in Python (deterministic): the expected output
    mp.fold_bn_(ref)
    mp.quantize_(ref, "int8")
    fresh = zoo.build("digits-cnn", tiny=True).model  # float, with its BatchNorm layers: load replays the folding
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in fresh.modules())
    loaded = mp.load(out, fresh)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.modules())
    assert torch.equal(loaded(x), ref(x))


def test_a_failed_step_leaves_no_mark_and_a_marked_model_pickles(tmp_path):
    """The mark comes and goes with modelpress layers: a quantize_ that failed and rolled back leaves a float model
    that save_pretrained writes; a pruned model (marked) still pickles whole (torch.save)."""
    m = tiny_llama()

    def boom(stage, done, total):
        if done >= 2:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        mp.quantize_(m, "int8", progress=boom)
    assert getattr(m, "hf_quantizer", None) is None
    m.save_pretrained(tmp_path / "float")
    mp.prune_(m, 0.5)
    assert m.hf_quantizer is not None
    torch.save(m, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    with pytest.raises(ValueError, match="modelpress.save"):
        back.save_pretrained(tmp_path / "sp")


def test_quantizing_an_already_quantized_checkpoint_is_refused_by_name(tmp_path, capsys):
    """a compressed-tensors (or GPTQ, AWQ ...) folder is not a float model: transformers would build its own
    quantized layers, which have no `weight` for modelpress to read"""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    from modelpress.hf import load_pretrained

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    m = transformers.LlamaForCausalLM(cfg).eval()
    mp.quantize_(m, mp.QuantConfig(weights="int8", exclude=["lm_head", "model.embed_tokens"]))
    mp.export(m, tmp_path / "ct", format="compressed-tensors")
    with pytest.raises(ValueError, match="already quantized checkpoint \\(quantization_config: compressed-tensors\\)"):
        load_pretrained(tmp_path / "ct")
    assert main(["quantize", str(tmp_path / "ct"), "--weights", "int4:g32", "--out", str(tmp_path / "q")]) == 1
    assert "already quantized checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_model_cast_after_quantizing_reloads_in_its_dtype(tmp_path, dtype):
    """config.json carries the dtype the model is in when saved (.half() does not update config.dtype)"""
    m = tiny_llama()
    mp.quantize_(m, "int4:g32")
    m.to(dtype)
    path = mp.save(m, tmp_path / "h")
    assert json.loads((path / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    ids = torch.randint(0, 64, (2, 5))
    assert torch.equal(mp.load(path, tiny_llama().to(dtype))(ids).logits, m(ids).logits)
    # built from config.json in that dtype; the rotary table (a buffer no file holds) would stay fp32 there, while
    # .to(dtype) had rounded it: the manifest records its dtype
    back = mp.load(path)
    assert back.model.norm.weight.dtype == dtype and back.model.rotary_emb.inv_freq.dtype == dtype
    assert torch.equal(back(ids).logits, m(ids).logits)


def test_buffer_dtypes_cast_every_owner_of_a_shared_buffer_and_skip_formats_load_refuses(tmp_path):
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
            table = torch.randn(4)
            self.a.register_buffer("t", table, persistent=False)
            self.b.register_buffer("t", table, persistent=False)
            self.a.register_buffer("f8", torch.zeros(2, dtype=torch.float8_e4m3fn), persistent=False)

        def forward(self, x):
            return self.b(self.a(x) * self.a.t) * self.b.t

    m = M()
    mp.quantize_(m, "int8")
    m.a.t = m.a.t.half()
    m.b.t = m.a.t  # shared, fp16
    path = mp.save(m, tmp_path / "m")
    back = mp.load(path, M())
    assert back.a.t.dtype == back.b.t.dtype == torch.float16 and torch.equal(back.a.t, back.b.t)  # both owners
    assert json.loads((path / "modelpress.json").read_text())["buffer_dtypes"] == {"a.t": "float16", "b.t": "float16"}
