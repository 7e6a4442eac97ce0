import pytest
import torch

import modelpress as mp
from modelpress.evaluate import EmbeddingTask, model_bytes
from modelpress.quant import QuantLinear, kernels
from modelpress.quant.kernels import paths
from modelpress.search import SensiMix


def _bert():
    from transformers import BertConfig, BertModel

    from modelpress.zoo.minilm import SentenceEmbedder

    cfg = BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=32)
    torch.manual_seed(0)
    model = SentenceEmbedder(BertModel(cfg, add_pooling_layer=False)).eval()
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 200, (8, 16), generator=g),
                "attention_mask": torch.ones(8, 16, dtype=torch.long)} for _ in range(4)]
    return model, batches[:3], EmbeddingTask(data=batches[3:])


def test_lower_blocks_in_8_bit_the_rest_in_1_bit_on_the_int8_gemm():
    model, calib, task = _bert()
    report = mp.compress(model, SensiMix(high_blocks=1), calib=calib, eval=task, latency_repeats=1)
    rec = report.steps[0]
    assert rec["step"] == "sensimix" and rec["plan"]["high_blocks"] == ["bert.encoder.layer.0"]
    assert model_bytes(model) == rec["plan"]["nbytes"]
    layers = dict(model.named_modules())
    assert str(layers["bert.encoder.layer.0.attention.self.query"].weight_format) == "int8"
    low = layers["bert.encoder.layer.3.output.dense"]
    assert str(low.weight_format) == "int1" and isinstance(low, QuantLinear)
    assert str(layers["bert.embeddings.word_embeddings"].weight_format) == "int4"
    x = torch.randn(24, low.in_features)
    usable = [n for n in ("native-int1", "int1_mm") if paths.applies("linear", n, low, kernels.cpu_info(), 24)]
    assert kernels.select(low, x) in (usable or [None])  # a 1-bit kernel where one runs here, not dequantization
    assert report.metrics["embedding_cosine"]["compressed"] > 0.5


def test_ratio_picks_as_many_8_bit_blocks_as_fit():
    ratios = []
    for k in range(5):
        model, calib, task = _bert()
        rep = mp.compress(model, SensiMix(high_blocks=k), calib=calib, latency_repeats=1)
        ratios.append(rep.size["ratio"])
    assert ratios == sorted(ratios, reverse=True)
    target = (ratios[1] + ratios[2]) / 2  # room for one 8-bit block, not two
    model, calib, task = _bert()
    rep = mp.compress(model, SensiMix(ratio=target), calib=calib, latency_repeats=1)
    assert rep.steps[0]["plan"]["high_blocks"] == ["bert.encoder.layer.0"] and rep.size["ratio"] >= target
    with pytest.raises(mp.TargetError, match="closest reachable ratio"):
        mp.compress(_bert()[0], SensiMix(ratio=ratios[0] * 1.5), calib=calib)


def test_sensitivity_selection_fits_the_budget():
    model, calib, task = _bert()
    rep = mp.compress(model, SensiMix(ratio=6, select="sensitivity"), calib=calib, eval=task, latency_repeats=1)
    plan = rep.steps[0]["plan"]
    assert rep.size["ratio"] >= 6 and model_bytes(model) == plan["nbytes"]
    assert {f for u, f in plan["formats"].items() if "encoder" in u} <= {"int8", "int1"}
    with pytest.raises(ValueError, match="needs a ratio"):
        SensiMix(select="sensitivity", high_blocks=2)


def test_sensimix_training_distils_the_float_model_through_1_bit_qat_and_converts_to_the_same_plan():
    model, calib, task = _bert()
    plain = mp.compress(_bert()[0], SensiMix(high_blocks=1), calib=calib, eval=task, latency_repeats=1)
    train = calib * 4
    report = mp.compress(model, SensiMix(high_blocks=1, train_steps=24), calib=calib, train=train,
                         eval=task, latency_repeats=1)
    rec = report.steps[0]
    assert rec["train"]["steps"] == 24 and rec["train"]["last_loss"] < rec["train"]["first_loss"]
    assert model_bytes(model) == rec["plan"]["nbytes"] == plain.steps[0]["plan"]["nbytes"]
    low = dict(model.named_modules())["bert.encoder.layer.3.output.dense"]
    assert str(low.weight_format) == "int1" and isinstance(low, QuantLinear)
    assert report.metrics["embedding_cosine"]["compressed"] > plain.metrics["embedding_cosine"]["compressed"]
    with pytest.raises(ValueError, match="training data"):
        mp.compress(_bert()[0], SensiMix(high_blocks=1, train_steps=5), calib=calib, latency_repeats=1)
