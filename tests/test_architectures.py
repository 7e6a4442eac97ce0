"""Ten transformers architectures built from tiny configs (decoders, encoders, encoder-decoders, vision, speech):
quantize_ -> save -> load into a fresh model -> forward: every Linear-like layer quantized, tied embeddings
stored once, reloaded bit-exactly, outputs close to the float model's."""
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

import modelpress as mp
from modelpress.quant import QuantMixin, quant_class

tr = pytest.importorskip("transformers")

V = 96


def _ids(g, shape=(2, 8)):
    return torch.randint(3, V, shape, generator=g)


def build(arch: str):
    """(tiny model, inputs); the same seed gives the same weights."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    dec = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=V,
               max_position_embeddings=32)
    seq2seq = dict(d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_layers=1, decoder_layers=1,
                   encoder_attention_heads=4, decoder_attention_heads=4, vocab_size=V, pad_token_id=0,
                   bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    if arch == "llama":
        m = tr.LlamaForCausalLM(tr.LlamaConfig(**dec, num_key_value_heads=2, tie_word_embeddings=True))
    elif arch == "qwen2":
        m = tr.Qwen2ForCausalLM(tr.Qwen2Config(**dec, num_key_value_heads=2))
    elif arch == "gpt2":
        m = tr.GPT2LMHeadModel(tr.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=V, n_positions=32,
                                             bos_token_id=1, eos_token_id=2))
    elif arch == "opt":
        m = tr.OPTForCausalLM(tr.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=4,
                                           vocab_size=V, max_position_embeddings=32, word_embed_proj_dim=32))
    elif arch == "bert":
        m = tr.BertForSequenceClassification(tr.BertConfig(**dec))
    elif arch == "distilbert":
        m = tr.DistilBertForMaskedLM(tr.DistilBertConfig(dim=32, hidden_dim=64, n_layers=1, n_heads=4, vocab_size=V,
                                                         max_position_embeddings=32))
    elif arch == "t5":
        m = tr.T5ForConditionalGeneration(tr.T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=4,
                                                      vocab_size=V))
    elif arch == "bart":
        m = tr.BartForConditionalGeneration(tr.BartConfig(**seq2seq, max_position_embeddings=32))
    elif arch == "whisper":
        m = tr.WhisperForConditionalGeneration(tr.WhisperConfig(**seq2seq, num_mel_bins=8, max_source_positions=16,
                                                                max_target_positions=32))
    else:  # vit
        m = tr.ViTForImageClassification(tr.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                      num_attention_heads=4, image_size=16, patch_size=4, num_labels=5))
        return m.eval(), {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    x = {"input_ids": _ids(g)} if arch != "whisper" else {"input_features": torch.randn(2, 8, 32, generator=g)}
    if arch in ("t5", "bart", "whisper"):
        x["decoder_input_ids"] = _ids(g)
    return m.eval(), x


ARCHS = ["llama", "qwen2", "gpt2", "opt", "bert", "distilbert", "t5", "bart", "whisper", "vit"]
TIED = {"llama", "gpt2", "opt", "distilbert", "t5", "bart", "whisper"}  # input embedding <-> output projection


@pytest.mark.parametrize("fmt", ["int4:g32", "int8"])
@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_save_load_forward(arch, fmt, tmp_path):
    m, x = build(arch)
    with torch.no_grad():
        ref = m(**x).logits
    float_bytes = mp.inspect(m).total_bytes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mp.quantize_(m, fmt)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "layer" in str(w.message)]
    # every Linear-like layer (Linear, Conv, transformers Conv1D, embeddings and their subclasses) is quantized
    left = [n for n, mod in m.named_modules() if not isinstance(mod, QuantMixin) and quant_class(mod) is not None]
    assert not left
    assert messages == ([] if arch != "vit" else ["1 layer(s) stay float: vit.embeddings (ViTEmbeddings is not a "
                                                  "supported layer type)"])  # its cls token / position table
    with torch.no_grad():
        y = m(**x).logits
    assert F.cosine_similarity(y.flatten(), ref.flatten(), dim=0) > (0.999 if fmt == "int8" else 0.85)
    assert mp.inspect(m).total_bytes < float_bytes / (2.5 if fmt == "int8" else 4)
    mp.save(m, tmp_path / "q")
    manifest = json.loads((tmp_path / "q" / "modelpress.json").read_text())
    shared = [a for a in manifest["aliases"] if a.endswith("_codes")]
    assert bool(shared) == (arch in TIED)  # tied weights: one packed copy, the other users are aliases
    fresh, _ = build(arch)
    with torch.no_grad():
        for p in fresh.parameters():  # nothing may come from the fresh model's own weights
            p.add_(1.0)
    loaded = mp.load(tmp_path / "q", fresh)
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, y)
