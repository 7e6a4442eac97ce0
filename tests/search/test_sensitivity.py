import json

import pytest
import torch

from modelpress.search.probe import Probe, divergence
from modelpress.search.sensitivity import Sensitivity, analyse, substituted, fake_quantized
from modelpress.search.units import find_units


def _llama(tie=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=32, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def test_replayed_blocks_give_the_costs_of_full_passes():
    model = _llama()
    batches = [torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    units = find_units(model)
    fast, slow = Probe(model, batches, kind="kl"), Probe(model, batches, kind="kl", replay=False)
    assert fast.replay_ok and not slow.replay_ok
    a = analyse(model, units, ["int4:g32", "int2:g32"], fast, blocks=False)
    b = analyse(model, units, ["int4:g32", "int2:g32"], slow, blocks=False)
    for u in a.layers:
        for f in a.layers[u]:
            assert a.layers[u][f] == pytest.approx(b.layers[u][f], rel=1e-4, abs=1e-9)
    with torch.inference_mode():  # the weights are back: the model gives the reference outputs again
        assert torch.equal(model(batches[0]).logits, fast.reference[0])


def test_block_costs_and_json_round_trip(tmp_path):
    model = _llama()
    batches = [torch.randint(0, 64, (2, 16))]
    sens = analyse(model, find_units(model), ["int8", "int3:g32"], Probe(model, batches, kind="kl"))
    assert set(sens.blocks) == {"model.layers.0", "model.layers.1", "model.layers.2"}
    for b, costs in sens.blocks.items():
        assert costs["int8"] < costs["int3:g32"]
        singles = sum(sens.layers[u]["int3:g32"] for u in sens.layers if u.startswith(b + "."))
        assert 0.3 * singles < costs["int3:g32"] < 3 * singles  # costs roughly add up within a block
    sens.save(tmp_path / "s.json")
    again = Sensitivity.load(tmp_path / "s.json")
    assert again.to_dict() == json.loads(json.dumps(sens.to_dict()))
    assert sens.ranking()[0] in sens.layers


def test_costs_the_time_budget_left_unmeasured_are_marked_as_estimates(tmp_path):
    """A deadline that passes during the measurements: the costs not measured are the Hessian estimates, and the table
    says which (they had been stored as measured, and a later run reusing the table could not tell); a table written
    without the field (an earlier version) reads as all measured."""
    import time

    model = _llama()
    batches = [torch.randint(0, 64, (2, 16))]
    units = find_units(model)
    probe = Probe(model, batches, kind="kl")
    full = analyse(model, units, ["int8", "int4:g32"], probe, hessian=True, blocks=False)
    assert full.estimated == {}
    late = analyse(model, units, ["int8", "int4:g32"], probe, hessian=True, blocks=False, deadline=time.monotonic())
    assert set(late.estimated) == set(late.layers) and all(sorted(f) == ["int4:g32", "int8"]
                                                           for f in late.estimated.values())
    assert late.layers == late.costs("hessian") and late.layers != full.layers
    late.save(tmp_path / "s.json")
    assert Sensitivity.load(tmp_path / "s.json").estimated == late.estimated
    old = full.to_dict()
    del old["estimated"]
    assert Sensitivity.from_dict(old).estimated == {}


def test_substituted_restores_tied_and_conv1d_weights():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16)).eval()
    units = {u.name: u for u in find_units(model)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attn = units["transformer.h.0.attn.c_attn"]
    vals, _ = fake_quantized(model, attn, "int2:g32")
    emb = [u for u in units.values() if u.kind == "embedding" and "lm_head" in u.members][0]
    evals, _ = fake_quantized(model, emb, "int2:g32")
    with substituted(model, {attn.name: vals, emb.name: evals}):
        assert torch.equal(model.transformer.h[0].attn.c_attn.weight, vals["weight"].t())  # Conv1D holds [in, out]
        assert torch.equal(model.lm_head.weight, evals["weight"])  # the tied user sees the change
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("kind", ["kl", "binary_kl", "cosine", "mse"])
def test_divergences_are_zero_at_the_reference_and_positive_elsewhere(kind):
    r = torch.randn(8, 5)
    assert divergence(kind, r, r).abs().max() < 1e-6
    assert (divergence(kind, r, r + 0.3 * torch.randn(8, 5)) > 0).all()
