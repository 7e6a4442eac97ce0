"""Shared test fixtures-as-functions: inputs with outlier channels, small models, an output-error measure."""
import torch
from torch import nn


def outlier_inputs(t=512, k=128, seed=0):
    """[t, k] Gaussian inputs whose first 4 channels are 30x larger (as trained LLMs' activations)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g)
    x[:, :4] *= 30
    return x


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).eval()


def rel_err(model, ref, inputs):
    """sum |model(x) - ref(x)|^2 / sum |ref(x)|^2 over the inputs."""
    with torch.no_grad():
        ys = [(model(x), ref(x)) for x in inputs]
    return sum((a - b).pow(2).sum() for a, b in ys).item() / sum(b.pow(2).sum() for _, b in ys).item()


def outlier_llama():
    """(config, tiny LlamaForCausalLM with 4 outlier channels per norm, calibration ids, test ids)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    f = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in f.model.layers:
            layer.input_layernorm.weight[:4] *= 20
            layer.post_attention_layernorm.weight[:4] *= 20
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 128, (4, 32), generator=g) for _ in range(4)]
    test = [torch.randint(0, 128, (4, 32), generator=g)]
    return cfg, f, calib, test


def labelled_batches(n=4, rows=32, dim=8, classes=3, seed=0):
    """n batches (x [rows, dim], label [rows]) whose labels a linear map of x determines (a learnable toy task)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, classes, generator=g)
    xs = [torch.randn(rows, dim, generator=g) for _ in range(n)]
    return [(x, (x @ w).argmax(-1)) for x in xs]
