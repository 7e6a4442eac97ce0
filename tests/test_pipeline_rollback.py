"""compress: bad calibration or evaluation data is found before the steps run; a failed step leaves the user's
model exactly as it was (the steps of a recipe run on a copy); success replaces the model's contents and leaves
the float layer objects the user may hold untouched."""
import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.evaluate import ClassificationTask
from modelpress.recipe import steps as recipe_steps


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4, 3)

    def forward(self, x):  # [B, 1, 6, 6]
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def toy():
    torch.manual_seed(0)
    model = CNN().train()  # as a user may hand it over
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 1, 6, 6, generator=g)
    with torch.no_grad():
        y = model.eval()(x).argmax(-1)
    model.train()
    return model, ClassificationTask(data=[(x[:16], y[:16]), (x[16:], y[16:])]), [x[:8], x[8:16]]


def state(model):
    return ({n: m for n, m in model.named_modules()}, {k: v.clone() for k, v in model.state_dict().items()},
            {n: m.training for n, m in model.named_modules()})


def assert_same(model, before):
    mods, tensors, flags = before
    assert {n: m for n, m in model.named_modules()} == mods
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tensors.items())
    assert {n: m.training for n, m in model.named_modules()} == flags


RECIPE = {"steps": [{"fold_bn": {}}, {"quantize": {"weights": "int8", "activations": "int8:static"}}]}


def test_failed_second_step_leaves_the_model_exactly_as_it_was(monkeypatch):
    """compress ran the steps in place: a failure in step 2 left step 1's BatchNorm folding."""
    model, task, calib = toy()
    before = state(model)

    def broken(self, model, ctx):
        raise RuntimeError("step 2 failed")

    monkeypatch.setattr(recipe_steps.QuantizeStep, "run", broken)
    with pytest.raises(RuntimeError, match="step 2 failed"):
        mp.compress(model, RECIPE, calib=calib, eval=task, latency_repeats=1)
    assert_same(model, before)
    assert not mp.recipe.structure.recorded(model)


def test_success_replaces_the_contents_and_leaves_the_old_layers_alone():
    model, task, calib = toy()
    conv, bn = model.conv, model.bn
    before = state(model)
    report = mp.compress(model, RECIPE, calib=calib, eval=task, latency_repeats=1)
    assert isinstance(model.conv, mp.QuantConv2d) and isinstance(model.bn, nn.Identity) and not model.training
    assert torch.equal(conv.weight, before[1]["conv.weight"]) and torch.equal(bn.running_var, before[1]["bn.running_var"])
    assert report.metrics["accuracy"]["reference"] == 1.0 and report.metrics["accuracy"]["compressed"] > 0.8


@pytest.mark.parametrize("make_bad, match", [
    (lambda t, c: (ClassificationTask(data=[(torch.randn(4, 1, 7), torch.zeros(4))]), c),
     r"eval: the first evaluation batch does not run through the model"),
    (lambda t, c: (ClassificationTask(data=[(t.data[0][0], torch.zeros(3, 5))]), c),
     r"eval: the first evaluation batch .*does not fit its targets"),
    (lambda t, c: ([(torch.randn(4, 1, 6, 6), torch.zeros(4))], c), r"eval must be an evaluation task"),
    (lambda t, c: (ClassificationTask(data=[]), c), r"eval: the evaluation task has no data"),
    (lambda t, c: (t, [torch.randn(4, 2, 6, 6)]), r"calib: the first batch does not run through the model"),
    (lambda t, c: (t, torch.randn(4, 1, 6, 6)), r"calib must be a list .* got a single Tensor: wrap one batch"),
    (lambda t, c: (t, []), r"calib is empty"),
])
def test_bad_data_is_found_before_the_steps(monkeypatch, make_bad, match):
    """A wrong `eval` input failed only after 157 s of quantizing."""
    model, task, calib = toy()
    bad_task, bad_calib = make_bad(task, calib)
    before = state(model)

    def forbidden(self, model, ctx):
        raise AssertionError("a step ran before the data were checked")

    monkeypatch.setattr(recipe_steps.QuantizeStep, "run", forbidden)
    monkeypatch.setattr(recipe_steps.FoldBNStep, "run", forbidden)
    with pytest.raises((ValueError, TypeError), match=match):
        mp.compress(model, RECIPE, calib=bad_calib, eval=bad_task, latency_repeats=1)
    assert_same(model, before)


def test_calibration_generator_is_read_once_and_a_used_one_is_named():
    model, _, calib = toy()
    gen = (x for x in calib)
    mp.quantize_(model, mp.QuantConfig(weights="int8", activations="int8:static"), calib=gen, method="gptq")
    assert isinstance(model.fc, mp.QuantLinear)  # ranges and GPTQ both saw every batch of the one-shot generator
    model2, _, _ = toy()
    with pytest.raises(ValueError, match=r"calib is empty: it is an iterator \(e.g. a generator\) that was already "
                                         r"used up"):
        mp.quantize_(model2, mp.QuantConfig(weights="int8", activations="int8:static"), calib=gen)
    assert isinstance(model2.fc, nn.Linear)


def test_quantize_input_errors_are_named():
    with pytest.raises(ValueError, match=r"the model is itself a Linear: .*wrap it, e.g. nn.Sequential\(layer\)"):
        mp.quantize_(nn.Linear(8, 8), "int8")
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"layer '0' has its weights on the meta device"):
        mp.quantize_(meta, "int8")
    model, _, calib = toy()
    with pytest.raises(ValueError, match=r"calib: the first batch does not run through the model \(RuntimeError"):
        mp.quantize_(model, "int8", calib=[torch.randn(2, 3)], method="gptq")
    with pytest.raises(TypeError, match=r"got a single dict"):
        mp.quantize_(model, "int8", calib={"x": calib[0]}, method="awq")
    assert isinstance(model.fc, nn.Linear)


def test_one_shot_eval_data_is_refused_before_work():
    model, task, calib = toy()
    one_shot = ClassificationTask(data=((x, y) for x, y in task.data))
    with pytest.raises(TypeError, match=r"eval: the evaluation data must be a list of batches .* got generator"):
        mp.compress(model, "w8", eval=one_shot)
