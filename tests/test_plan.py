"""Layer planning: tied weights quantized once and shared (or kept float / stored per user, and said so), modules
registered under two names quantized once and shared under both, every selected weight that stays float named."""
import json
import warnings

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress import QuantConfig, quantize_
from modelpress.plan import plan_layers


class TiedLM(nn.Module):
    """Embedding <-> lm_head tied, plus a block registered under two names."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.block = nn.Linear(32, 32)
        self.again = self.block  # the same module under a second name
        self.lm_head = nn.Linear(32, 64, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, idx):
        return self.lm_head(torch.tanh(self.again(torch.tanh(self.block(self.embed(idx))))))


def make(seed=0):
    torch.manual_seed(seed)
    return TiedLM().eval()


IDX = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))


def quantized(config):
    m = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_(m, config)
    return m, " ".join(str(w.message) for w in caught)


def test_tied_weight_quantized_once_and_module_shared_under_both_names(tmp_path):
    m, msg = quantized(QuantConfig(weights="int4:g32"))
    assert not msg
    assert type(m.embed) is mp.QuantEmbedding and type(m.lm_head) is mp.QuantLinear
    assert m.lm_head.weight_codes is m.embed.weight_codes  # one packed copy
    assert m.again is m.block and type(m.block) is mp.QuantLinear
    float_bytes = mp.inspect(make()).total_bytes
    q_bytes = mp.inspect(m).total_bytes
    assert q_bytes < float_bytes / 5  # the embedding is counted once, not once per user
    mp.save(m, tmp_path / "q")
    manifest = json.loads((tmp_path / "q" / "modelpress.json").read_text())
    assert set(manifest["layers"]) == {"embed", "block", "lm_head"}
    assert manifest["aliases"]["lm_head.weight_codes"] == "embed.weight_codes"
    assert manifest["aliases"]["again.weight_codes"] == "block.weight_codes"
    loaded = mp.load(tmp_path / "q", make(seed=2))
    assert loaded.again is loaded.block and loaded.lm_head.weight_scale is loaded.embed.weight_scale
    with torch.no_grad():
        assert torch.equal(loaded(IDX), m(IDX))
    d = mp.dequantize(loaded)  # a plain float model, still tied
    assert type(d.lm_head) is nn.Linear and d.lm_head.weight is d.embed.weight and d.again is d.block


def test_tied_user_excluded_keeps_the_group_float():
    m, msg = quantized(QuantConfig(weights="int8", exclude=["lm_head"]))
    assert type(m.embed) is nn.Embedding and m.lm_head.weight is m.embed.weight
    assert "embed (its weight is tied to lm_head, which stay(s) float" in msg


def test_tied_users_with_different_formats_are_stored_per_user_and_said_so():
    m, msg = quantized(QuantConfig(weights="int4:g32", overrides={"lm_head": "int8"}))
    assert str(m.lm_head.weight_format) == "int8" and str(m.embed.weight_format) == "int4:g32"
    assert m.lm_head.weight_codes is not m.embed.weight_codes
    assert "tied weight of embed, lm_head is quantized once per user (formats int4:g32, int8): stored 2 times" in msg


def test_tied_weight_shared_with_gptq():
    m = make()
    calib = [torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    quantize_(m, "int4:g32", calib=calib, method="gptq")
    assert m.lm_head.weight_codes is m.embed.weight_codes


class Odd(nn.Module):
    """Weights held outside supported layers: a raw parameter matrix next to a child, a 3-D convolution."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Parameter(torch.randn(8, 8))
        self.fc = nn.Linear(8, 8)
        self.conv3 = nn.Conv3d(2, 2, 1)


def test_every_selected_weight_that_stays_float_is_named():
    planned = plan_layers(Odd(), QuantConfig(weights="int8"))
    assert [p.name for p in planned.plans] == ["fc"]
    assert [n for n, _ in planned.skipped] == ["conv3"]  # the root holds `mix` itself: not a selectable layer
    outer = nn.Sequential(Odd())
    assert [n for n, _ in plan_layers(outer, QuantConfig(weights="int8")).skipped] == ["0", "0.conv3"]


def test_failure_restores_shared_and_tied_modules():
    m = make()
    block, embed, head = m.block, m.embed, m.lm_head
    with pytest.raises(ValueError, match="calibration"):
        quantize_(m, "int4:g32", method="awq")
    assert m.block is block and m.again is block and m.embed is embed and m.lm_head is head
    assert m.lm_head.weight is m.embed.weight
