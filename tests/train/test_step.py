import copy
import time

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.quant import QuantLinear
from modelpress.recipe import Context, load_recipe
from modelpress.train.checkpoint import read_checkpoint
from modelpress.train.step import TrainStep
from helpers import labelled_batches


def data(n=4):
    return labelled_batches(n)


def model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))
    mp.train.fit(m, data(), mp.train.supervised_loss, steps=60, lr=0.05)
    return m.eval()


STEP = {"steps": 6, "lr": 0.01, "qat": {"weights": "int2", "activations": "int8:static"},
        "qat_options": {"method": "quantnoise", "noise_rate": 0.5},
        "distill": {"task": 1.0, "output": 1.0, "temperature": 2.0, "feature": 0.5, "layers": {"1": "1"}}}


def ctx_for(m, **kw):
    return Context(calib=[x for x, _ in data()], train=data(), reference=copy.deepcopy(m), **kw)


def test_recipe_options_round_trip_and_errors():
    r = load_recipe({"steps": [{"train": STEP}]})
    step = r.steps[0]
    assert isinstance(step, TrainStep) and step.qat.weights == "int2" and step.distill.layers == {"1": "1"}
    assert load_recipe(r.to_dict()).steps[0] == step
    with pytest.raises(ValueError, match="option 'lr' of recipe step 'train' must be a number"):
        load_recipe({"steps": [{"train": {"steps": 5, "lr": "fast"}}]})
    with pytest.raises(ValueError, match="unknown option.*'qat_options'"):
        load_recipe({"steps": [{"train": {"steps": 5, "qat_options": {"metod": "fst"}}}]})
    warm = load_recipe({"steps": [{"train": {**STEP, "warmup": 2}}]})
    assert warm.steps[0].warmup == 2 and warm.to_dict()["steps"][0]["train"]["warmup"] == 2
    assert load_recipe(warm.to_dict()).steps[0] == warm.steps[0]
    with pytest.raises(ValueError, match="warmup must be >= 0 and below steps"):
        load_recipe({"steps": [{"train": {"steps": 5, "warmup": 5}}]})
    with pytest.raises(ValueError, match="exactly one of `steps` or `epochs`"):
        load_recipe({"steps": [{"train": {"lr": 0.1}}]})


def test_train_step_distils_quantizes_and_converts():
    m = model()
    ctx = ctx_for(m)
    TrainStep.from_options(STEP).run(m, ctx)
    assert isinstance(m[0], QuantLinear) and isinstance(m[3], QuantLinear)
    rec = ctx.records[-1]
    assert rec["step"] == "train" and rec["steps"] == 6 and rec["converted"] and rec["estimated_seconds"] > 0
    assert not m._forward_pre_hooks and m[2].p == 0.1  # distiller detached, dropout as it was


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path):
    opts = {**STEP, "checkpoint_every": 3, "dropout": True}
    straight = model()
    TrainStep.from_options({**opts, "checkpoint": str(tmp_path / "a.ckpt")}).run(straight, ctx_for(straight))

    calls = []

    def interrupt(stage, done, total):
        calls.append(done)
        if done == 4:
            raise KeyboardInterrupt

    resumed = model()
    before = {k: v.clone() for k, v in resumed.state_dict().items()}
    step = TrainStep.from_options({**opts, "checkpoint": str(tmp_path / "b.ckpt")})
    with pytest.raises(KeyboardInterrupt):
        step.run(resumed, ctx_for(resumed, progress=interrupt))
    assert type(resumed[0]) is nn.Linear and all(torch.equal(v, resumed.state_dict()[k]) for k, v in before.items())
    assert read_checkpoint(tmp_path / "b.ckpt")[0]["step"] == 3
    ctx = ctx_for(resumed)
    step.run(resumed, ctx)
    assert ctx.records[-1]["resumed_from"] == 3 and ctx.records[-1]["steps"] == 3
    mp.set_kernels(straight, False), mp.set_kernels(resumed, False)
    x = data()[0][0]
    assert torch.equal(resumed(x), straight(x))
    other = model()
    with pytest.raises(ValueError, match="other options"):
        TrainStep.from_options({**opts, "lr": 0.02, "checkpoint": str(tmp_path / "b.ckpt")}).run(other, ctx_for(other))


def test_budget_stops_early_and_missing_data_is_an_error():
    m = model()
    ctx = ctx_for(m, deadline=time.monotonic() - 1)
    TrainStep(steps=50).run(m, ctx)
    assert ctx.records[-1]["stopped_early"] and ctx.records[-1]["steps"] == 0
    with pytest.raises(ValueError, match="needs training data"):
        TrainStep(steps=5).run(m, Context())


def test_compress_runs_a_train_recipe():
    m = model()
    rep = mp.compress(m, {"steps": [{"train": {"epochs": 1.0, "qat": {"weights": "int4"}}}]},
                      train=data(), calib=[x for x, _ in data()])
    assert rep.steps[0]["total_steps"] == 4 and isinstance(m[0], QuantLinear)


def test_scale_lr_gives_the_quantizer_step_sizes_their_own_learning_rate():
    from modelpress.train.step import _quantizer_param

    m = model()
    lsq = {"weights": "int4", "activations": "int8:static"}
    scales = {}
    for scale_lr in (1e-12, 1e-2):
        work = copy.deepcopy(m)
        TrainStep(steps=4, lr=0.01, scale_lr=scale_lr, qat=mp.QuantConfig(**lsq), qat_options=mp.train.QATConfig(
            scales="learned", act_ranges="learned"), convert=False).run(work, ctx_for(m))
        scales[scale_lr] = {n: p.detach().clone() for n, p in work.named_parameters() if _quantizer_param(n)}
    start = copy.deepcopy(m)
    mp.train.prepare_qat_(start, mp.QuantConfig(**lsq), mp.train.QATConfig(scales="learned", act_ranges="learned"),
                          calib=[x for x, _ in data()])
    init = {n: p.detach() for n, p in start.named_parameters() if _quantizer_param(n)}
    assert set(init) == {"0.weight_quant.scale", "3.weight_quant.scale", "0.input_quant.lo", "0.input_quant.hi",
                         "3.input_quant.lo", "3.input_quant.hi"}
    for n, v in init.items():  # a tiny scale_lr leaves them where calibration put them; a large one moves them
        assert torch.allclose(scales[1e-12][n], v, atol=1e-9) and not torch.allclose(scales[1e-2][n], v, atol=1e-5)
    with pytest.raises(ValueError, match="scale_lr must be > 0"):
        TrainStep(steps=1, scale_lr=0.0)


@pytest.mark.parametrize("opts, message", [
    ({"clip_grad": -1.0}, "clip_grad must be > 0 and finite \\(or omitted\\), got -1.0"),
    ({"clip_grad": 0.0}, "clip_grad must be > 0 and finite \\(or omitted\\), got 0.0"),
    ({"clip_grad": float("nan")}, "clip_grad must be > 0 and finite \\(or omitted\\), got nan"),
    ({"weight_decay": -0.01}, "weight_decay must be >= 0 and finite, got -0.01"),
    ({"weight_decay": float("inf")}, "weight_decay must be >= 0 and finite, got inf"),
    ({"lr": float("nan")}, "lr and scale_lr must be > 0 and finite, got nan / None"),
    ({"steps": None, "epochs": float("inf")}, "epochs must be > 0 and finite, got inf"),
    ({"freeze_ranges_after": -1}, "freeze_ranges_after must be >= 0, got -1"),
    ({"qat_options": {"init": "gptqq"}}, "init must be 'float' or a quantization method \\(rtn, gptq, .*got 'gptqq'"),
    ({"qat_options": {"ste_clip": 0.0}}, "ste_clip must be > 0 and finite, got 0.0"),
    ({"qat_options": {"abwr": -1.0}}, "abwr must be >= 0 and finite, got -1.0"),
])
def test_invalid_options_are_refused_when_the_recipe_is_read(opts, message):
    with pytest.raises(ValueError, match=f"recipe step 'train'.*{message}"):
        load_recipe({"steps": [{"train": {"steps": 5, **opts}}]})


def test_valid_clip_grad_weight_decay_and_init_are_kept():
    step = load_recipe({"steps": [{"train": {"steps": 5, "clip_grad": 1.0, "weight_decay": 0.01,
                                             "freeze_ranges_after": 0, "qat_options": {"init": "gptq"}}}]}).steps[0]
    assert (step.clip_grad, step.weight_decay, step.freeze_ranges_after, step.qat_options.init) == (1.0, 0.01, 0, "gptq")


class FakeTime:
    """time.perf_counter / time.monotonic that move only when the model runs: the first forward costs 100 s
    (start-up), each later one 1 s."""

    def __init__(self):
        self.now, self.calls = 1000.0, 0

    def perf_counter(self):
        return self.now

    monotonic = perf_counter

    def forward(self, *args):
        self.calls += 1
        self.now += 100.0 if self.calls == 1 else 1.0


def test_time_estimate_and_budget_follow_the_step_rate_after_start_up(monkeypatch):
    import modelpress.recipe.context as context_mod
    import modelpress.train.loop as loop_mod
    import modelpress.train.step as step_mod

    clock = FakeTime()
    for mod in (context_mod, loop_mod, step_mod):
        monkeypatch.setattr(mod, "time", clock)
    m = model()
    m.register_forward_hook(clock.forward)
    ctx = Context(train=data(), deadline=1150.0)  # 150 s: the start-up step, then 1 s a step
    TrainStep(steps=1000, lr=0.01).run(m, ctx)
    rec = ctx.records[-1]
    # steps end at 1100, 1101, ...: the 52nd at 1151, past the deadline (the first 5 steps alone said 20.8 s a step)
    assert rec["stopped_early"] and rec["steps"] == 52 and rec["seconds"] == 151.0
    assert rec["budget_allows_steps"] == 52 and rec["estimated_seconds"] == 151.0 + 948 * 1.0


def test_estimate_measures_the_recent_rate():
    from modelpress.train.step import Estimate

    est, now = Estimate(start=10, steps=110, t0=0.0), 50.0  # resumed at step 10; a 50 s start-up step
    for step in range(11, 90):  # 1 s a step, 0.5 s from the 20th step of this call on
        est.update(step, now, left=200.0 - now)
        now += 1.0 if step < 30 else 0.5
    # step 89 at 98.5 s: the rate is measured since 20 steps done (the mark moves at 5, 10, 20, 40...): 0.5 s a step
    assert est.out == {"estimated_seconds": 98.5 + 21 * 0.5}  # and the budget (101.5 s left) allows them all
    est.update(90, 549.0, left=100.0)  # a slow step: since step 30 (at 69 s) 8 s a step, 12 more fit in 100 s
    assert est.out == {"estimated_seconds": 549.0 + 20 * 8.0, "budget_allows_steps": 102}


def rewrite(path, meta=None, drop=(), add=None):
    """Rewrite the checkpoint at `path` with raw metadata `meta` (a string), without tensors `drop`, plus `add`."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata()["modelpress_checkpoint"]
        tensors = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
    save_file({**tensors, **(add or {})}, str(path), metadata={"modelpress_checkpoint": json.dumps(
        meta(json.loads(raw))) if callable(meta) else raw if meta is None else meta})


@pytest.mark.parametrize("damage, message", [
    ({"meta": '{"version": 1,'}, "its metadata is not valid JSON"),
    ({"meta": "[1]"}, "its metadata is a JSON list, not an object"),
    ({"meta": lambda d: {k: v for k, v in d.items() if k != "info"}}, "its metadata has no 'info'"),
    ({"meta": lambda d: {**d, "step": "2"}}, "'step' in its metadata is '2', not an integer"),
    ({"meta": lambda d: {**d, "step": -1}}, "'step' in its metadata is -1, below 0"),
    ({"meta": lambda d: {**d, "version": "1"}}, "'version' in its metadata is '1', not an integer"),
    ({"meta": lambda d: {**d, "info": [1]}}, "'info' in its metadata is \\[1\\], not an object"),
    ({"meta": lambda d: {**d, "optimizer": {"groups": [{"params": ["a"]}], "scalars": {}}}},
     "the optimizer's parameter groups in its metadata are damaged"),
    ({"meta": lambda d: {**d, "optimizer": {**d["optimizer"], "scalars": {"x": 1}}}},
     "the optimizer's scalars in its metadata are damaged"),
    ({"drop": ("rng",)}, "its RNG state is missing, not torch.uint8"),
    ({"drop": ("rng",), "add": {"rng": torch.zeros(4, dtype=torch.uint8)}}, "its RNG state is torch.uint8 \\[4\\]"),
    ({"add": {"optim.x.y": torch.zeros(1)}}, "it holds tensors of unknown names: \\['optim.x.y'\\]"),
])
def test_damaged_checkpoint_is_refused_naming_the_file_and_the_model_stays(tmp_path, damage, message):
    path = tmp_path / "c.ckpt"
    step = TrainStep(steps=2, checkpoint=str(path))
    step.run(model(), Context(train=data()))
    rewrite(path, **damage)
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=f"^{path} is not a readable checkpoint: {message}"):
        step.run(m, Context(train=data()))
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items()) and len(m.state_dict()) == len(before)


def test_newer_checkpoint_is_refused(tmp_path):
    path = tmp_path / "c.ckpt"
    TrainStep(steps=2, checkpoint=str(path)).run(model(), Context(train=data()))
    rewrite(path, meta=lambda d: {"version": 2})
    with pytest.raises(ValueError, match="written by a newer modelpress \\(checkpoint version 2\\)"):
        read_checkpoint(path)


def test_checkpoint_of_another_model_is_refused_before_anything_is_loaded(tmp_path):
    from modelpress.train.checkpoint import restore

    path = tmp_path / "c.ckpt"
    step = TrainStep(steps=2, checkpoint=str(path))
    step.run(model(), Context(train=data()))
    torch.manual_seed(1)
    other = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 3))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=f"^checkpoint {path} belongs to another model \\(shapes: 0.weight is "
                                         "\\[16, 8\\] there, \\[32, 8\\] here, 0.bias is \\[16\\] there"):
        step.run(other, Context(train=data()))
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())
    # the model matches but an extra module (distillation projections) does not: the model is not loaded either
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    meta, tensors = read_checkpoint(path)
    with pytest.raises(ValueError, match="^the checkpoint belongs to another model \\(proj: missing: weight\\)"):
        restore(meta, {**tensors, "model.0.bias": tensors["model.0.bias"] + 1}, m, {"proj": nn.Linear(2, 2, bias=False)})
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_a_checkpoint_resumes_only_the_same_starting_weights(tmp_path):
    """A step before the train step that changed (other channels pruned) gives other starting weights of the same
    shapes: the checkpoint had been resumed silently (0 steps run on the old run's weights)."""
    path = tmp_path / "c.ckpt"
    step = TrainStep(steps=2, checkpoint=str(path))
    step.run(model(), Context(train=data()))
    same = model()
    assert step.run(same, Context(train=data()))["resumed_from"] == 2  # the same start: resumed
    changed = model()
    with torch.no_grad():
        changed[0].weight[0, 0] += 1
    before = {k: v.clone() for k, v in changed.state_dict().items()}
    with pytest.raises(ValueError, match="written by a train step with other starting weights"):
        step.run(changed, Context(train=data()))
    assert all(torch.equal(v, changed.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="is a folder; give the path of a file"):
        TrainStep(steps=2, checkpoint=str(tmp_path)).run(model(), Context(train=data()))
    with pytest.raises(ValueError, match=r"freeze pattern\(s\) \['nomatch\*'\] match no parameter"):
        TrainStep(steps=2, freeze=["nomatch*"]).run(model(), Context(train=data()))
