"""compressed-tensors export, round-tripped through its real consumer: transformers' from_pretrained with the
compressed-tensors package gives the logits of modelpress's model (reference path: exact in fp32)."""
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

import modelpress as mp

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def tiny_llama(tie=False):
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def quantized(weights, activations=None, exclude=("lm_head",), tie=False):
    m = tiny_llama(tie)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.quantize_(m, mp.QuantConfig(weights=weights, activations=activations, exclude=list(exclude)))
    return mp.set_kernels(m, False)


def reload(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(path, **kw).eval()


def cosine(a, b):
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), 0).item()


@pytest.mark.parametrize("weights,activations", [("int4:g128", None), ("int8", None), ("int8", "int8"),
                                                 ("fp8_e4m3", None), ("int3:g32", None), ("ternary:g32", None)])
def test_from_pretrained_gives_modelpress_logits(tmp_path, weights, activations):
    m = quantized(weights, activations, exclude=("lm_head", "re:.*embed.*"))
    ref = m(IDS).logits
    mp.export(m, tmp_path / "ct", format="compressed-tensors")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["ignore"] == ["lm_head"]
    back = reload(tmp_path / "ct")
    assert type(back).__name__ == "LlamaForCausalLM"
    out = back(IDS).logits
    assert cosine(out, ref) >= 0.9999 and (out - ref).abs().max() < 1e-4


def test_int4_g128_against_the_kernel_path_and_quantized_embeddings(tmp_path):
    m = quantized("int4:g128")  # embeddings quantized too: written dense (same values), with a warning
    mp.set_kernels(m, True)  # modelpress's model as it runs by default (bf16 int4 kernel)
    ref = m(IDS).logits
    with pytest.warns(UserWarning, match="embed_tokens"):
        mp.export(m, tmp_path / "ct", format="compressed-tensors")
    assert cosine(reload(tmp_path / "ct")(IDS).logits, ref) >= 0.9999


@pytest.mark.parametrize("weights", ["int4:g32:asym", "int8:asym", "nvfp4"])
def test_asymmetric_and_nvfp4_load_dequantized(tmp_path, weights):
    """compressed-tensors 0.20 builds compressed modules without packed zero points (and decodes nvfp4 in bf16),
    so these load with dequantize=True; the file itself is the standard layout vLLM reads."""
    m = quantized(weights, exclude=("lm_head", "re:.*embed.*"))
    ref = m(IDS).logits
    mp.export(m, tmp_path / "ct", format="compressed-tensors")
    back = reload(tmp_path / "ct", quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
    assert cosine(back(IDS).logits, ref) >= (0.9999 if weights != "nvfp4" else 0.9995)


def test_tied_embeddings_and_tokenizer_travel(tmp_path):
    # a tied group with one user excluded stays float (and tied): the export keeps the tie
    m = quantized("int8", exclude=("re:.*embed.*",), tie=True)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    ref = m(IDS).logits
    mp.export(m, tmp_path / "ct", format="compressed-tensors")
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["tie_word_embeddings"] is True
    assert cosine(reload(tmp_path / "ct")(IDS).logits, ref) >= 0.9999
    # quantized together: the embedding is written dense and lm_head compressed, so they are no longer tied
    m = quantized("int8", exclude=(), tie=True)
    ref = m(IDS).logits
    mp.export(m, tmp_path / "ct2", format="compressed-tensors")
    assert json.loads((tmp_path / "ct2" / "config.json").read_text())["tie_word_embeddings"] is False
    assert cosine(reload(tmp_path / "ct2")(IDS).logits, ref) >= 0.9999


def test_inexpressible_layers_are_named_and_nothing_is_written(tmp_path):
    m = quantized("mxfp4", exclude=("lm_head", "re:.*embed.*"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*mxfp4"):
        mp.export(m, tmp_path / "ct", format="compressed-tensors")
    assert not (tmp_path / "ct").exists() and list(tmp_path.iterdir()) == []
    m = quantized("int4:g48", exclude=("lm_head",))  # 256 = 5 x 48 + 16: modelpress pads the last group
    with pytest.raises(ValueError, match=r"q_proj.*partial group of 16.*multiple of the group size 48"):
        mp.export(m, tmp_path / "ct", format="compressed-tensors")
    assert not (tmp_path / "ct").exists()
    conv = mp.quantize_(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), "int8")
    with pytest.raises(TypeError, match="transformers model"):
        mp.export(conv, tmp_path / "c", format="compressed-tensors")
    with pytest.raises(ValueError, match="unknown export format"):
        mp.export(m, tmp_path / "x", format="tflite")


@pytest.mark.parametrize("weights,activations", [("int8", None), ("int4:g32", None), ("int8", "int8")])
def test_linear_biases_travel(tmp_path, weights, activations):
    """OPT's Linears have biases (a trained model's are not zero): the export keeps them beside the codes."""
    cfg = transformers.OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=1,
                                 num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64)
    torch.manual_seed(0)
    m = transformers.OPTForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.quantize_(m, mp.QuantConfig(weights=weights, activations=activations,
                                       exclude=["lm_head", "re:.*embed.*"]))
    mp.set_kernels(m, False)
    ref = m(IDS).logits
    mp.export(m, tmp_path / "ct", format="compressed-tensors")
    back = reload(tmp_path / "ct")
    fc1 = back.model.decoder.layers[0].fc1
    assert torch.equal(fc1.bias, m.model.decoder.layers[0].fc1.bias)
    out = back(IDS).logits
    # (W8A8: compressed-tensors rounds a few per-token activation codes differently, ~1 in 10^4 logits moves 3e-4)
    assert cosine(out, ref) >= 0.99999 and (out - ref).abs().max() < (1e-4 if activations is None else 1e-3)


def test_gpt2_conv1d_is_refused_by_name(tmp_path):
    """transformers compresses nn.Linear only: a GPT-2 Conv1D written compressed would load with random weights."""
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=256,
                                                             n_positions=64)).eval()
    mp.quantize_(m, mp.QuantConfig(weights="int4:g32", exclude=["lm_head"]))
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn.*Conv1D"):
        mp.export(m, tmp_path / "ct", format="compressed-tensors")
    assert list(tmp_path.iterdir()) == []


def test_t5_warns_and_loads_dequantized(tmp_path):
    cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                                decoder_start_token_id=0)
    torch.manual_seed(0)
    m = transformers.T5ForConditionalGeneration(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.quantize_(m, mp.QuantConfig(weights="int8", exclude=["lm_head", "shared", "re:.*embed.*"]))
    ids, dec = torch.randint(0, 64, (2, 7)), torch.randint(0, 64, (2, 3))
    ref = m(input_ids=ids, decoder_input_ids=dec).logits
    with pytest.warns(UserWarning, match="T5-family.*dequantize=True"):
        mp.export(m, tmp_path / "ct", format="compressed-tensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = transformers.T5ForConditionalGeneration.from_pretrained(
            tmp_path / "ct", quantization_config=transformers.CompressedTensorsConfig(dequantize=True)).eval()
    assert cosine(back(input_ids=ids, decoder_input_ids=dec).logits, ref) >= 0.9999
