import copy

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.recipe import Context, load_recipe
from modelpress.train import output_tensor
from modelpress.train.average import WeightAverage, average_decay
from modelpress.train.checkpoint import read_checkpoint
from modelpress.train.step import TrainStep
from helpers import labelled_batches


def test_average_follows_the_warm_up_then_the_decay():
    p = nn.Parameter(torch.zeros(3))
    avg = WeightAverage([p], decay=0.5)
    avg.copy_to_params()  # before any update: nothing to copy
    assert torch.equal(p.detach(), torch.zeros(3))
    for v in (1.0, 2.0, 3.0):  # decays 2/11, 3/12, 4/13 (the warm-up is below 0.5)
        with torch.no_grad():
            p.fill_(v)
        avg.update()
    assert average_decay(0.5, 1) == pytest.approx(2 / 11) and average_decay(0.5, 20) == 0.5
    assert avg.averages()[0][0].item() == pytest.approx(2.601398, abs=1e-6)
    avg.copy_to_params()
    assert p[0].item() == pytest.approx(2.601398, abs=1e-6) and int(avg.count) == 3
    with torch.no_grad():
        p.fill_(3.0)
    avg.update()  # decay 5/14
    assert avg.averages()[0][0].item() == pytest.approx(2.601398 * 5 / 14 + 3.0 * 9 / 14, abs=1e-6)
    for _ in range(30):  # then at most 0.5: the distance to the weights shrinks to nothing
        avg.update()
    assert avg.averages()[0][0].item() == pytest.approx(3.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"decay must be in \(0, 1\)"):
        WeightAverage([p], decay=1.0)


def data(n=4):
    return labelled_batches(n)


def model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    mp.train.fit(m, data(), mp.train.supervised_loss, steps=60, lr=0.05)
    return m.eval()


def ctx_for(m):
    return Context(calib=[x for x, _ in data()], train=data(), reference=copy.deepcopy(m))


QAT = {"steps": 8, "lr": 0.02, "qat": {"weights": "int3"}, "qat_options": {"scales": "frozen"},
       "distill": {"task": 1.0, "output": 1.0}, "convert": False}


def test_train_step_keeps_the_weight_average_and_converts_it_bit_identically(tmp_path):
    plain, averaged = model(), model()
    trace = []  # the latent weights after every step of the run without averaging
    step = TrainStep.from_options(QAT)
    original = step._loss

    def recording(distiller):
        loss = original(distiller)

        def fn(m, batch):
            trace.append(m[0].weight.detach().clone())
            return loss(m, batch)
        return fn

    object.__setattr__(step, "_loss", recording)
    step.run(plain, ctx_for(plain))
    weights = trace[1:] + [plain[0].weight.detach().clone()]  # each step's loss sees the previous step's result
    expected = trace[0].clone()  # the average starts at the weights training starts from
    for t, w in enumerate(weights, start=1):
        d = average_decay(0.6, t)
        expected = d * expected + (1 - d) * w
    ema = TrainStep.from_options({**QAT, "ema": 0.6, "checkpoint": str(tmp_path / "a.ckpt")})
    ema.run(averaged, ctx_for(averaged))
    assert torch.allclose(averaged[0].weight, expected, atol=1e-6)
    assert not torch.allclose(averaged[0].weight, plain[0].weight, atol=1e-3)  # the average is not the last step
    meta, tensors = read_checkpoint(tmp_path / "a.ckpt")
    assert meta["step"] == 8 and int(tensors["extra.average.count"]) == 8
    x = data()[0][0]
    with torch.no_grad():
        fake = output_tensor(averaged(x))
        mp.train.convert_(averaged)
        mp.set_kernels(averaged, False)
        assert torch.equal(fake, averaged(x))
    loaded = load_recipe({"steps": [{"train": {**QAT, "ema": 0.6}}]}).steps[0]
    assert loaded.ema == 0.6 and loaded.to_dict()["train"]["ema"] == 0.6
    with pytest.raises(ValueError, match=r"ema must be in \(0, 1\)"):
        TrainStep(steps=4, ema=1.5)
