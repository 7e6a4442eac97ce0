"""Channel pruning: a model whose pruned channels are already unused gives the same outputs after they are
physically removed (ResNet-style with residual adds and a concatenation, depthwise CNN); every importance;
save / load replays the structure bit-exactly; the importance functions by hand."""
import copy

import pytest
import torch

import modelpress as mp
from modelpress.transforms.prune import ChannelPruneConfig, prune_channels_
from modelpress.transforms.prune import importance as imp
from modelpress.transforms.prune.channels import kept_count, plan_channels
from modelpress.recipe.structure import recorded, replay
from modelpress.transforms.prune.surgery import commit
from prune_models import DepthwiseNet, ResNetish, images, randomize_bn


def silence_pruned(model, shrink):
    """Zero the weights that read the channels about to be removed, so the model no longer uses them."""
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, dims in shrink.items():
            if "in" in dims:  # Linear, or Conv2d with groups=1 (depthwise convs only follow their input)
                w = mods[name].weight
                drop = torch.ones(w.shape[1], dtype=torch.bool)
                drop[dims["in"]] = False
                w[:, drop] = 0


@pytest.mark.parametrize("net", [ResNetish, DepthwiseNet])
@pytest.mark.parametrize("importance", ["l1", "l2", "ezcrop", "activation", "taylor"])
def test_removing_unused_channels_keeps_outputs(net, importance):
    torch.manual_seed(0)
    model = randomize_bn(net())
    data = images()
    train = [(x, torch.randint(0, 10, (x.shape[0],))) for x in data]
    cfg = ChannelPruneConfig(ratio=0.5, importance=importance, recalibrate_bn=False)
    shrink, counts = plan_channels(model, cfg, data, train)
    assert counts["channels_removed"] > 0
    silence_pruned(model, shrink)
    x = images(1, seed=9)[0]
    with torch.no_grad():
        before = model(x)
    params = sum(p.numel() for p in model.parameters())
    commit(model, shrink)
    with torch.no_grad():
        after = model(x)
    assert after.shape == before.shape
    assert torch.allclose(after, before, atol=1e-5, rtol=1e-4), (after - before).abs().max()
    assert sum(p.numel() for p in model.parameters()) < 0.6 * params


def test_shapes_save_load_and_replay(tmp_path):
    torch.manual_seed(0)
    ref = randomize_bn(ResNetish())
    model = copy.deepcopy(ref)
    data = images()
    info = prune_channels_(model, ChannelPruneConfig(ratio=0.5, importance="l1"), calib=data)
    assert info["params_after"] < 0.35 * info["params_before"]
    assert model.stem[0].out_channels == model.b1[1][0].out_channels == 4  # tied by the residual add
    assert model.mix[0].in_channels == model.left[0].out_channels + model.right[0].out_channels == 10
    assert model.head.in_features == model.mix[0].out_channels * 16
    x = images(1, seed=3)[0]
    y = model(x)
    mp.save(model, tmp_path / "m")
    loaded = mp.load(tmp_path / "m", randomize_bn(ResNetish(), seed=5))  # other values: all are reloaded
    assert torch.equal(loaded(x), y)
    # pruned, then quantized: the structure replays before the quantized layers are filled
    mp.quantize_(model, "int8")
    mp.save(model, tmp_path / "q")
    assert torch.equal(mp.load(tmp_path / "q", ResNetish())(x), model(x))
    with pytest.raises(ValueError, match="cannot replay"):
        mp.load(tmp_path / "m", DepthwiseNet())


@pytest.mark.parametrize("keep", [[0, 1, 2, 2**70], [0, 1, 2, -1], [0, 0, 1, 2], ["0", "1", "2", "3"], [0.5, 1, 2, 3]])
def test_replay_refuses_kept_indices_that_are_not_channels(keep):
    """a damaged record's kept indices (huge, negative, repeated, not integers) name the layer instead of reaching
    torch (which raised its own overflow / dtype messages, or repeated a channel)"""
    torch.manual_seed(0)
    model = randomize_bn(ResNetish())
    prune_channels_(model, ChannelPruneConfig(ratio=0.5, importance="l1"), calib=images())
    record = copy.deepcopy(recorded(model))
    spec = next(s for s in record[0]["options"]["shrink"].values() if "out" in s and len(s["out"]) >= 4)
    spec["out"][:4] = keep
    with pytest.raises(ValueError, match="kept output channels must be distinct indices below"):
        replay(ResNetish(), record)


def test_include_exclude_round_to_and_checks():
    torch.manual_seed(0)
    model = randomize_bn(DepthwiseNet())
    prune_channels_(model, ChannelPruneConfig(ratio=0.5, include=["features.2.*"], round_to=8), calib=images())
    assert model.features[2][0].out_channels == 16 and model.features[0][0].out_channels == 16
    assert kept_count(24, 0.5, 8) == 16 and kept_count(3, 0.9) == 1 and kept_count(10, 0.0) == 10
    with pytest.raises(ValueError, match="example input"):
        prune_channels_(DepthwiseNet(), 0.5)
    with pytest.raises(ValueError, match="importance"):
        ChannelPruneConfig(importance="random")
    with pytest.raises(ValueError, match="training batches"):
        prune_channels_(DepthwiseNet(), ChannelPruneConfig(importance="taylor"), calib=images())
    with pytest.raises(ValueError, match="calib: the first batch does not run through the model"):
        prune_channels_(DepthwiseNet(), 0.5, calib=[torch.randn(2, 5, 16, 16)])  # (not a tracing error)
    only_head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))  # its outputs are the model's
    with pytest.warns(UserWarning, match="removed no channel"):
        assert prune_channels_(only_head, 0.5, calib=[torch.randn(2, 3, 2, 2)])["channels_removed"] == 0


def test_a_failure_after_the_cut_leaves_the_model_as_it_was():
    """A calibration batch that fails only in the BatchNorm re-estimation (after the layers were cut) is named, and
    the whole step is undone: every tensor (shapes, values, BatchNorm statistics) and the structure record as
    before, the same module objects, and the model still prunes afterwards."""
    torch.manual_seed(0)
    model = randomize_bn(ResNetish())
    mp.quantize_(model, mp.QuantConfig(weights="int8", include=["head"]))  # (noted its model's weight bytes)
    noted = model.head.model_weight_bytes
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mods = dict(model.named_modules())
    bad = [images(n=1)[0], torch.randn(8, 5, 8, 8)]  # the second batch has 5 channels
    model.train()
    model.b1[0][1].eval()  # a frozen BatchNorm in a training model
    flags = {n: m.training for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="calib: batch 1 does not run through the pruned model"):
        prune_channels_(model, 0.5, calib=bad)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert dict(model.named_modules()) == mods and recorded(model) == []
    assert {n: m.training for n, m in model.named_modules()} == flags and model.head.model_weight_bytes == noted
    model.eval()
    assert model.stem[0].out_channels == 8 and model.b2[1][1].num_features == 16
    prune_channels_(model, 0.5, calib=images())
    assert model.stem[0].out_channels == 4


@pytest.mark.parametrize("importance", ["l2", "activation"])
def test_planning_changes_nothing_in_a_model_in_training_mode(importance):
    """plan_channels traces and (activation importance) runs the model: in training mode that updated every
    BatchNorm's running statistics."""
    model = randomize_bn(ResNetish()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shrink, counts = plan_channels(model, ChannelPruneConfig(ratio=0.5, importance=importance), images(), None)
    assert shrink and counts["channels_removed"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items()) and model.training


def test_nan_weights_are_refused_by_layer():
    """A layer to be cut with NaN weights is refused by name; one left whole (excluded) is not prune_channels_' to
    judge, as for prune_."""
    model = ResNetish()
    with torch.no_grad():
        model.b1[0][0].weight[0, 0, 0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer 'b1.0.0' has NaN or infinite weights; refusing to prune it"):
        prune_channels_(model, 0.5, calib=images())
    head_nan = ResNetish()
    with torch.no_grad():
        head_nan.head.weight[0, 0] = float("nan")
    prune_channels_(head_nan, ChannelPruneConfig(ratio=0.5, include=["b1.*"]), calib=images())
    assert head_nan.b1[0][0].out_channels == 4
    for k, v in before.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0, equal_nan=True)


def test_bn_recalibration_restores_statistics():
    torch.manual_seed(0)
    model = randomize_bn(DepthwiseNet())
    data = images(n=8)
    prune_channels_(model, ChannelPruneConfig(ratio=0.5), calib=data)
    bn = model.features[2][1]
    with torch.no_grad():
        z = torch.cat([model.features[:2](x) for x in data])
        pre = model.features[2][0](z)
    # one pass with every BatchNorm on batch statistics: close to the statistics the eval model produces
    assert torch.allclose(bn.running_mean, pre.mean(dim=(0, 2, 3)), atol=3e-3)
    assert torch.allclose(bn.running_var, pre.var(dim=(0, 2, 3)), rtol=0.05)


def test_importance_functions_by_hand():
    w = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    assert torch.allclose(imp.row_norms(w), torch.tensor([5.0, 1.0]))
    assert torch.allclose(imp.row_norms(w, 1), torch.tensor([7.0, 1.0]))
    assert torch.allclose(imp.col_norms(w), torch.tensor([10**0.5, 4.0]))
    g = torch.tensor([[1.0, -1.0], [2.0, 0.0]])
    assert torch.allclose(imp.taylor(w, g), torch.tensor([1.0, 2.0]))
    assert imp.zone_step(8, 8) == 1 and imp.zone_step(32, 32) == 4 and imp.zone_step(3, 3) == 0
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    maps = torch.stack([torch.ones(8, 8),  # constant: all energy at the centre (DC)
                        torch.sin(yy * 0.4) + 2,  # smooth
                        (-1.0) ** (yy + xx),  # checkerboard: the highest frequency
                        torch.zeros(8, 8)])[None]  # dead channel
    s = imp.ezcrop(maps.repeat(2, 1, 1, 1))
    assert s[2] > s[1] > s[0] and s[3] == 0
    assert 0 <= float(s.min()) and float(s.max()) <= 1
    assert torch.allclose(imp.channel_energy(torch.ones(2, 3, 4), 1), torch.full((3,), 8.0, dtype=torch.float64))


@pytest.mark.parametrize("size", [(8, 8), (7, 9), (4, 4)])
def test_ezcrop_equals_direct_computation(size):
    """EZCrop (Lin et al., WACV'22) by its definition, without fftshift: 1 - the share of log(1 + |FFT|) lying in
    the low-frequency zone |k_y|, |k_x| <= s (s = zone_step), per image, averaged over the images."""
    h, w = size
    g = torch.Generator().manual_seed(0)
    fmap = torch.relu(torch.randn(3, 5, h, w, generator=g))
    s = imp.zone_step(h, w)
    ky = (torch.fft.fftfreq(h) * h).round().abs()[:, None]
    kx = (torch.fft.fftfreq(w) * w).round().abs()[None, :]
    low = (ky <= s) & (kx <= s)
    assert int(low.sum()) == (2 * s + 1) ** 2
    e = torch.log1p(torch.fft.fft2(fmap.double()).abs())
    want = (1 - (e * low).sum((-2, -1)) / e.sum((-2, -1))).mean(0)
    assert torch.allclose(imp.ezcrop(fmap).double(), want, atol=1e-5)


def test_ezcrop_keeps_high_frequency_channels():
    """Pruning ranks by EZCrop keeps the channel whose maps carry more energy outside the low-frequency zone (the
    reference ranking: highest ratio kept), even when its weights are smaller (L1 keeps the other)."""
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 1, bias=False), torch.nn.ReLU(), torch.nn.Conv2d(2, 3, 3))
    with torch.no_grad():
        net[0].weight.copy_(torch.diag(torch.tensor([1.5, 1.0]))[:, :, None, None])
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    x = torch.stack([torch.sin(yy * 0.4) + 2, (-1.0) ** (yy + xx) + 2])[None].repeat(4, 1, 1, 1)
    kept = {}
    for importance in ("ezcrop", "l1"):
        shrink, _ = plan_channels(net, ChannelPruneConfig(ratio=0.5, importance=importance), [x], None)
        kept[importance] = shrink["0"]["out"].tolist()
    assert kept == {"ezcrop": [1], "l1": [0]}
