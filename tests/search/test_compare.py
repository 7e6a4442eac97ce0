import math

import pytest
import torch
from torch import nn

from modelpress.evaluate import model_bytes
from modelpress.search.allocate import Plan, uniform
from modelpress.search.compare import comparison_batches, complexity, input_of, paired_bootstrap, prefer
from modelpress.search.driver import pick_measured
from modelpress.search.probe import Probe
from modelpress.search.units import find_units, model_fixed_bytes


def _normal_share(d: torch.Tensor) -> float:
    """P(mean < 0) under the normal approximation of the sample mean."""
    z = float(d.mean()) / (float(d.std()) / math.sqrt(d.numel()))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_paired_bootstrap_matches_the_normal_approximation_of_the_mean_difference():
    g = torch.Generator().manual_seed(1)
    base = torch.rand(400, generator=g)
    d = -0.05 + torch.randn(400, generator=g)  # a small advantage, within the noise
    mean, share = paired_bootstrap(base + d, base, resamples=4000, seed=3)
    assert mean == pytest.approx(float(d.double().mean()), abs=1e-7)  # base + d rounds in float32
    expected = _normal_share(d.double())
    assert 0.6 < expected < 0.97  # a near-tie, neither side certain
    assert share == pytest.approx(expected, abs=0.03)
    assert paired_bootstrap(base + d, base, resamples=4000, seed=3)[1] == share  # seeded: reproducible
    assert paired_bootstrap(base - 1, base)[1] == 1.0 and paired_bootstrap(base + 1, base)[1] == 0.0
    assert paired_bootstrap(base, base) == (0.0, 0.0)  # identical costs: never ahead
    with pytest.raises(ValueError, match="at least one sample"):
        paired_bootstrap(torch.zeros(0), torch.zeros(0))


def test_prefer_replaces_the_incumbent_only_beyond_the_noise():
    g = torch.Generator().manual_seed(1)
    base = torch.rand(400, generator=g)
    near = base - 0.05 + torch.randn(400, generator=g)  # lower mean, share ahead ~0.8 (< 0.95)
    replace, diff, share = prefer(near, base, confidence=0.95)
    assert diff < 0 and 0.5 < share < 0.95 and not replace
    assert prefer(near, base, confidence=0.5)[0]  # comparing (about) the means alone: it would replace
    clear = base - 0.5 + torch.randn(400, generator=g)  # ~10 standard errors ahead
    replace, diff, share = prefer(clear, base, confidence=0.95)
    assert replace and share == 1.0 and diff == pytest.approx(float((clear - base).double().mean()))
    assert not prefer(base + 0.5, base, confidence=0.0)[0]  # a higher mean never replaces


def test_training_inputs_are_recognised_and_calibration_rows_left_out():
    x = torch.randn(96, 4)
    calib = list(x[:64].split(32))
    train = [(x[i:i + 16], torch.zeros(16, dtype=torch.long)) for i in range(0, 96, 16)]
    batches, added = comparison_batches(calib, calib[-1:], train, extra=8)
    assert added == 2 and len(batches) == 3  # rows 64..95: the two training batches with no calibration row
    assert torch.equal(batches[1], x[64:80]) and torch.equal(batches[2], x[80:96])
    assert comparison_batches(calib, calib[-1:], train, extra=1)[1] == 1
    assert comparison_batches(calib, calib[-1:], train, extra=0) == (calib[-1:], 0)
    assert comparison_batches(calib, calib[-1:], None, extra=8) == (calib[-1:], 0)
    batches, added = comparison_batches(calib, calib[-1:], [x[56:72]], extra=8)  # rows 56..63 are calibration rows
    assert added == 1 and torch.equal(batches[1], x[64:72])
    # tokenized inputs: a calibration sentence padded to another length is still recognised and left out
    calib_tok = [{"input_ids": torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}]
    train_tok = [{"input_ids": torch.tensor([[8, 9, 0], [3, 4, 2]]), "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])}]
    batches, added = comparison_batches(calib_tok, calib_tok, train_tok, extra=8)
    assert added == 1 and batches[1]["input_ids"].tolist() == [[3, 4, 2]] and batches[1]["attention_mask"].tolist() == [[1, 1, 1]]
    # inputs that are themselves pairs (dense, ids), training batches ((dense, ids), clicks)
    pair = (torch.randn(8, 3), torch.randint(0, 9, (8, 2)))
    assert input_of(((torch.randn(8, 3), torch.randint(0, 9, (8, 2))), torch.ones(8).bool()), pair)[0].shape == (8, 3)
    assert input_of((torch.randn(8, 3), torch.randint(0, 9, (8, 2))), pair) is not None  # an unlabelled input
    assert input_of(({"ids": torch.zeros(2, 3)}, torch.zeros(2)), pair) is None  # another structure: not used


def _toy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    return model, [torch.randn(64, 32) for _ in range(4)]


def _mixed(units, fixed, ref, formats) -> Plan:
    base = uniform(units, "int8", fixed, ref)
    fm = dict(zip([u.name for u in units], formats))
    return Plan(formats=fm, members=base.members, nbytes=fixed + sum(u.nbytes(fm[u.name]) for u in units),
                reference_bytes=ref, cost=math.nan)


def test_pick_measured_keeps_the_uniform_plan_unless_the_mix_is_ahead_beyond_the_noise():
    model, calib = _toy()
    units = find_units(model)
    fixed, ref = model_fixed_bytes(model, units), model_bytes(model)
    probe = Probe(model, calib[-2:], kind="kl")
    coarse = uniform(units, "int2:g32", fixed, ref)
    better = _mixed(units, fixed, ref, ["int8", "int8", "int2:g32"])  # far closer to float than int2 everywhere
    assert complexity(better.formats) == 2 and complexity(coarse.formats) == 1
    plan, q, cost, rows = pick_measured(model, [better, coarse], calib, probe, confidence=0.95)
    assert plan is better and rows[0]["chosen"] and not rows[1]["chosen"]
    assert rows[0]["against"] == "uniform int2:g32" and rows[0]["share_ahead"] == 1.0
    assert rows[0]["samples"] == 128 and cost == pytest.approx(probe.cost(model=q), rel=1e-9)
    assert rows[0]["mean_difference"] == pytest.approx(rows[0]["measured_cost"] - rows[1]["measured_cost"])
    fine = uniform(units, "int8", fixed, ref)
    worse = _mixed(units, fixed, ref, ["int8", "int2:g32", "int8"])  # listed first, measures worse than int8
    plan, q, cost, rows = pick_measured(model, [worse, fine], calib, probe, confidence=0.95)
    assert plan is fine and rows[1]["chosen"] and rows[0]["mean_difference"] > 0 and not rows[0]["chosen"]
    assert model_bytes(q) == fine.nbytes


def test_per_sample_costs_are_one_per_sequence_and_average_to_the_probe_cost():
    torch.manual_seed(0)
    lm = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 50)).eval()  # logits [batch, tokens, vocab]
    batches = [torch.randint(0, 50, (3, 7)), torch.randint(0, 50, (5, 7))]
    probe = Probe(lm, batches, output_fn=lambda m, x: m(x), kind="kl", replay=False)
    other = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 50)).eval()
    other.load_state_dict(lm.state_dict())
    with torch.no_grad():
        other[1].weight.add_(0.05 * torch.randn_like(other[1].weight))
    per = probe.per_sample(other)
    assert per.shape == (8,) and bool((per > 0).all())
    assert float(per.mean()) == pytest.approx(probe.cost(model=other), rel=1e-9)  # equal tokens per sequence
    assert float(probe.per_sample().abs().max()) == 0.0  # the float model itself: no divergence
