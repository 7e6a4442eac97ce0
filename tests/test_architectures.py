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
from modelpress.zoo.tiny_hf import ARCHS, V, build

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


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_generate_with_the_quantized_model(arch):
    m, x = build(arch)
    mp.quantize_(m, "int8")
    x.pop("decoder_input_ids", None)
    out = m.generate(**x, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] >= 4
    assert m.get_input_embeddings().weight.shape == (V, 32) and isinstance(m.get_output_embeddings(), torch.nn.Linear)
