"""Tiny Hugging Face models of ten architectures, built from configs (nothing is downloaded): decoders (Llama,
Qwen2, GPT-2, OPT), encoders (BERT, DistilBERT), encoder-decoders (T5, BART), speech (Whisper) and vision (ViT).
Hidden size 32, one layer per stack, vocabulary 96: for tests and for trying a feature on architectures you did
not write. `build(arch)` returns (model in eval mode, a batch of keyword inputs)."""
from __future__ import annotations

import torch


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("the tiny Hugging Face models need transformers: pip install modelpress[hf]") from None
    return transformers


ARCHS = ["llama", "qwen2", "gpt2", "opt", "bert", "distilbert", "t5", "bart", "whisper", "vit"]
V = 96


def _ids(g, shape=(2, 8)):
    return torch.randint(3, V, shape, generator=g)


def build(arch: str):
    """(tiny model, keyword inputs); the same architecture always gets the same weights."""
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(ARCHS)}")
    tr = _transformers()
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
                                                      vocab_size=V, pad_token_id=0, eos_token_id=1,
                                                      decoder_start_token_id=0))
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
