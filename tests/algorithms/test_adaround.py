"""AdaRound: the relaxation pieces, codes on the format's grid, lower layer error than round-to-nearest,
bias correction, the quantize_ handler, and a recipe (fold_bn + equalize + adaround) through compress."""
import copy

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import modelpress as mp
from modelpress.algorithms import adaround as ar
from modelpress.recipe import Recipe
from modelpress.formats import codes_grid, dequantize_tensor, parse_format, quantize_tensor, signed
from modelpress.formats.integer import int_range

FAST = ar.Config(iters=200)


def layer_out(m, x, w):
    return F.linear(x, w) if isinstance(m, nn.Linear) else m._conv_forward(x, w, None)


def layer_err(m, xs, w):
    return sum((layer_out(m, x, w) - layer_out(m, x, m.weight.detach())).pow(2).sum().item() for x in xs)


def layer_and_inputs(kind, seed=0):
    """A layer and correlated, non-negative (post-ReLU-like) calibration inputs."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind == "linear":
        mix = torch.randn(48, 48, generator=g) / 7
        return nn.Linear(48, 24), [torch.relu(torch.randn(64, 48, generator=g) @ mix + 0.3) for _ in range(4)]
    m = nn.Conv2d(8, 16, 3, padding=1) if kind == "conv" else nn.Conv2d(8, 8, 3, padding=1, groups=8)
    return m, [torch.relu(F.avg_pool2d(torch.randn(8, 8, 8, 8, generator=g), 3, 1, 1) * 3 + 0.2) for _ in range(4)]


def test_relaxation_pieces():
    frac = torch.tensor([0.0, 0.1, 0.5, 0.93, 1.0])
    torch.testing.assert_close(ar.rectified_sigmoid(ar.init_v(frac)), frac, atol=2e-4, rtol=0)
    assert ar.round_regularizer(torch.tensor([0.0, 1.0, 1.0]), 2.0).item() == 0
    assert ar.round_regularizer(torch.tensor([0.5]), 2.0).item() == 1
    cfg = ar.Config(warmup=0.2, beta_start=20, beta_end=2)
    assert ar.beta_at(10, 100, cfg) is None
    assert ar.beta_at(20, 100, cfg) == 20 and ar.beta_at(100, 100, cfg) == pytest.approx(2)


def test_bias_correction_on_a_matrix():
    torch.manual_seed(0)
    w = torch.randn(8, 6)
    wq = dequantize_tensor(quantize_tensor(w, "int3"))
    x = torch.randn(200, 6) + 1.5
    delta = ar.bias_correction(w, wq, x.mean(0))
    torch.testing.assert_close(delta, (w - wq) @ x.mean(0))
    torch.testing.assert_close((x @ wq.T + delta).mean(0), (x @ w.T).mean(0), atol=1e-5, rtol=0)
    # grouped conv: a per-channel mean broadcast over the kernel equals the explicit full patch mean
    wc, wcq = torch.randn(8, 2, 3, 3), torch.randn(8, 2, 3, 3)
    mean = torch.rand(4)
    full = mean.view(4, 1, 1).expand(4, 3, 3)
    torch.testing.assert_close(ar.bias_correction(wc, wcq, mean, groups=2), ar.bias_correction(wc, wcq, full, groups=2))
    with pytest.raises(ValueError, match="x_mean must have shape"):
        ar.bias_correction(wc, wcq, torch.rand(3), groups=2)


@pytest.mark.parametrize("layer, shape", [
    (nn.Linear(6, 4), (2, 3, 6)),
    (nn.Conv1d(4, 6, 3, padding=2, dilation=2, groups=2), (2, 4, 9)),
    (nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (2, 4, 7, 7)),
    (nn.Conv2d(4, 4, (3, 2), padding="same", padding_mode="reflect"), (2, 4, 6, 5)),
])
def test_layer_rows_reproduce_the_layer(layer, shape):
    """rows [G, n, K] @ W_g^T gives the layer's output (the im2col order matches weight.reshape(out, -1))."""
    x = torch.randn(*shape)
    rows = ar.layer_rows(layer, x)
    g = getattr(layer, "groups", 1)
    w = layer.weight.detach().reshape(g, layer.weight.shape[0] // g, -1)
    y = (rows @ w.transpose(1, 2)).permute(1, 0, 2).reshape(rows.shape[1], -1)  # [n, out]
    ref = layer_out(layer, x, layer.weight.detach())
    if not isinstance(layer, nn.Linear):
        ref = ref.movedim(1, -1)  # channels last: rows are (sample, position)
    ref = ref.reshape(-1, ref.shape[-1])
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", ["int4", "int3:g16", "int4:g16:asym", "int4:tensor"])
def test_zero_steps_reproduce_round_to_nearest(spec):
    m, xs = layer_and_inputs("conv")
    q = quantize_tensor(m.weight.detach(), spec)
    factor, _ = ar.input_factor(m, xs, 1024)
    q0 = ar.learn_codes(m.weight.detach(), q, factor, 1, ar.Config(iters=0))
    assert torch.equal(q0.codes, q.codes) and q0.scale is q.scale and q0.zero is q.zero


@pytest.mark.parametrize("kind", ["linear", "conv", "depthwise"])
@pytest.mark.parametrize("spec", ["int4", "int3", "int3:g16:asym"])
def test_lower_layer_error_than_rtn_and_codes_in_range(kind, spec):
    m, xs = layer_and_inputs(kind)
    fmt = parse_format(spec)
    rtn = layer_err(m, xs, dequantize_tensor(quantize_tensor(m.weight.detach(), fmt)))
    q, bias = ar.quantize_layer(m, xs, fmt, ar.Config(iters=200, bias_correction=False))
    assert bias is None
    ada = layer_err(m, xs, dequantize_tensor(q))
    assert ada <= 0.8 * rtn, (ada, rtn)
    u = codes_grid(q)
    lo, hi = int_range(fmt.bits, fmt.symmetric)
    vals = signed(u, fmt.bits) if fmt.symmetric else u.int()
    assert lo <= vals.min() and vals.max() <= hi


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_bias_correction_removes_mean_output_error(kind):
    m, xs = layer_and_inputs(kind, seed=1)
    float_m = copy.deepcopy(m)
    q, bias = ar.quantize_layer(m, xs, parse_format("int3"), ar.Config(iters=0, bias_correction=True))
    assert torch.equal(m.bias, float_m.bias)  # the float layer is left alone
    wq, dims = dequantize_tensor(q), ((0,) if kind == "linear" else (0, 2, 3))

    def mean_err(bias):
        return torch.stack([(F.linear(x, wq, bias) if kind == "linear" else m._conv_forward(x, wq, bias))
                            - float_m(x) for x in xs]).mean(0).mean(dims).abs()  # [out]

    before, after = mean_err(float_m.bias.detach()), mean_err(bias)
    assert after.max() < 1e-4 and after.max() < 0.02 * before.max(), (before.max(), after.max())


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10, bias=False)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def tiny_cnn():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    for bn in (model.bn1, model.bn2):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2)
    g = torch.Generator().manual_seed(1)
    return model, [torch.rand(16, 1, 8, 8, generator=g) for _ in range(4)]


def test_quantize_with_adaround_beats_rtn_on_a_model():
    model, calib = tiny_cnn()
    x = torch.cat(calib)
    ref = model(x)

    def err(method):
        m = mp.quantize_(copy.deepcopy(model), "int3", calib=calib, method=method)
        assert isinstance(m.conv1, mp.QuantConv2d) and isinstance(m.fc, mp.QuantLinear)
        return (m(x) - ref).pow(2).mean().item()

    assert err(FAST) < 0.8 * err("rtn")
    m = mp.quantize_(copy.deepcopy(model), "int3", calib=calib, method=FAST)
    assert m.fc.bias is not None  # bias correction created it


@pytest.mark.parametrize("fold", [False, True])
def test_biases_added_by_bias_correction_save_and_reload_bit_exact(fold, tmp_path):
    """Layers built with bias=False get a bias from bias correction; the saved folder reloads onto a fresh
    float model (fold: BN folding recorded as structure and replayed on load, fc still gets its bias here)."""
    model, calib = tiny_cnn()
    if fold:
        mp.fold_bn_(model)
    mp.quantize_(model, "int4", calib=calib, method=ar.Config(iters=20))
    assert model.fc.bias is not None and model.conv1.bias is not None
    mp.save(model, tmp_path / "q")
    fresh = tiny_cnn()[0]
    assert fresh.fc.bias is None
    loaded = mp.load(tmp_path / "q", fresh)
    x = torch.cat(calib)
    assert loaded is fresh and isinstance(loaded.fc, mp.QuantLinear) and torch.equal(loaded(x), model(x))
    assert loaded.state_dict().keys() == model.state_dict().keys()


def test_other_formats_are_refused_and_the_model_is_left_alone():
    model, calib = tiny_cnn()
    for spec in ("fp8_e4m3", "mxfp4", "int1"):
        with pytest.raises(ValueError, match=f"adaround.*{spec}"):
            mp.quantize_(model, spec, calib=calib, method="adaround")
    assert isinstance(model.conv1, nn.Conv2d) and model.fc.bias is None


def test_recipe_fold_equalize_adaround_through_compress():
    model, calib = tiny_cnn()
    x = torch.cat(calib)
    ref = model(x)
    text = """
name: cnn-w4
steps:
  - fold_bn: {}
  - equalize: {iterations: 20}
  - quantize: {weights: int4, method: adaround, method_options: {iters: 100, n_samples: 32}}
"""
    recipe = Recipe.from_dict(yaml.safe_load(text))
    assert Recipe.from_dict(yaml.safe_load(recipe.to_yaml())) == recipe
    assert [next(iter(s)) for s in recipe.to_dict()["steps"]] == ["fold_bn", "equalize", "quantize"]
    report = mp.compress(model, recipe, calib=calib, latency_repeats=1)
    assert isinstance(model.bn1, nn.Identity) and isinstance(model.conv2, mp.QuantConv2d)
    assert report.recipe["steps"][2]["quantize"]["method"] == "adaround"
    assert (model(x) - ref).pow(2).mean() < 0.01 * ref.pow(2).mean()


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_conv1d_padding_modes(mode):
    """(a Conv1d's reflect / replicate / circular padding was applied after its input became 4-D: torch refused)"""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv1d(8, 16, 3, padding=1, padding_mode=mode)).eval()
    x = torch.randn(4, 8, 20)
    ref = m(x)
    mp.quantize_(m, "int8", calib=[x], method="adaround")
    assert isinstance(m[0], mp.QuantConv1d)
    assert (m(x) - ref).norm() / ref.norm() < 0.02
