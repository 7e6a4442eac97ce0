import copy
import warnings

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.quant import QuantConv2d, QuantEmbeddingBag, QuantLinear
from modelpress.quant.nnac import ATTR, NNACRouter
from modelpress.quant.qat import QATConv2d, QATEmbedding, QATLinear
from modelpress.quant.qat_quantizers import ActFakeQuant, WeightFakeQuant
from modelpress.train import QATConfig, abwr_penalty, convert_, prepare_qat_


class Net(nn.Module):
    """Conv + grouped conv + EmbeddingBag + Linear: every QAT layer kind in one small model."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.bag = nn.EmbeddingBag(40, 8, mode="sum")
        self.head = nn.Linear(16, 5)

    def forward(self, img, ids):
        f = torch.relu(self.dw(torch.relu(self.conv(img)))).mean((2, 3))
        e = self.bag(ids, torch.arange(ids.shape[0]))
        return self.head(torch.cat([f, e], 1))


def net():
    torch.manual_seed(0)
    return Net().eval()


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(6, 1, 6, 6, generator=g), torch.randint(0, 40, (6,), generator=g)


CALIB = [batch(i) for i in range(3)]


def train_a_little(m, steps=3):
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    m.train()
    for i in range(steps):
        loss = m(*batch(10 + i)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()


def assert_convert_keeps_outputs(m, *x):
    """convert_ (then the reference path) gives exactly what the fake-quant forward gave on x; returns those outputs."""
    with torch.no_grad():
        fake = m(*x)
    convert_(m)
    mp.set_kernels(m, False)
    with torch.no_grad():
        assert torch.equal(m(*x), fake)
    return fake


@pytest.mark.parametrize("weights,acts,opts", [
    ("int4:g8", "int4:static", {}),
    ("int2:asym", "int8", {"scales": "learned"}),
    ("int8", "int8:static", {"scales": "frozen", "act_ranges": "granular"}),
    ("int1:g8", None, {}),
    ("ternary", "int4:static", {"act_ranges": "learned"}),
    ("fp4_e2m1:g8", "fp8_e4m3", {"scales": "learned"}),
    ("mxfp4", "fp8_e4m3:static", {"method": "fst"}),
    ("nvfp4", None, {"method": "quantnoise", "fat": True}),
    ("int3", "int4:static", {"nnac_clusters": 2}),
])
def test_convert_is_bit_identical_to_the_fake_quant_forward(weights, acts, opts):
    m = net()
    prepare_qat_(m, mp.QuantConfig(weights=weights, activations=acts), QATConfig(**opts), calib=CALIB)
    assert isinstance(m.conv, QATConv2d) and isinstance(m.head, QATLinear)
    train_a_little(m)
    x = batch(99)
    with torch.no_grad():
        fake = m(*x)
    convert_(m)
    assert isinstance(m.conv, QuantConv2d) and isinstance(m.bag, QuantEmbeddingBag) and isinstance(m.head, QuantLinear)
    assert not any(isinstance(c, (WeightFakeQuant, ActFakeQuant)) for c in m.modules())  # no QAT leftovers
    assert m.head.float_cls is nn.Linear and m.conv.float_cls is nn.Conv2d  # dequantize rebuilds the float layers
    mp.set_kernels(m, False)
    with torch.no_grad():
        assert torch.equal(m(*x), fake)


def test_convert_then_save_and_load_round_trip_with_nnac(tmp_path):
    m = net()
    prepare_qat_(m, mp.QuantConfig(weights="int4", activations="int4:static"), QATConfig(nnac_clusters=3),
                 calib=CALIB)
    train_a_little(m)
    convert_(m)
    mp.set_kernels(m, False)
    x = batch(7)
    with torch.no_grad():
        y = m(*x)
    mp.save(m, tmp_path / "out")
    loaded = mp.load(tmp_path / "out", net())
    mp.set_kernels(loaded, False)
    assert isinstance(getattr(loaded, ATTR), NNACRouter)
    with torch.no_grad():
        assert torch.equal(loaded(*x), y)


def test_nnac_picks_the_nearest_centroids_ranges():
    m = net()
    prepare_qat_(m, mp.QuantConfig(weights="int8", activations="int4:static"), QATConfig(nnac_clusters=2),
                 calib=CALIB)
    router = getattr(m, ATTR)
    assert router.feature == "conv" and router.layers == ["conv", "dw", "head"]
    with torch.no_grad():  # two far-apart centroids, and very different ranges for the 'dw' layer per cluster
        router.centroids.zero_()
        router.centroids[1] += 100.0
        i = router.layers.index("dw")
        router.lo[i], router.hi[i] = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.01, 50.0, 50.0])
    seen = {}
    m.dw.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    img, ids = batch(5)
    with torch.no_grad():
        m(img, ids)
    assert torch.equal(router._ids, torch.zeros(6, dtype=torch.long))  # the conv features are near 0, not 100
    assert 0 < seen["x"].max() <= 0.01 + 1e-6  # cluster 0's range [0, 0.01] was applied
    with torch.no_grad():
        router.centroids[0] += 1000.0  # now cluster 1 is nearest
        seen.clear()
        m(img, ids)
    assert torch.equal(router._ids, torch.ones(6, dtype=torch.long))
    assert seen["x"].abs().max() == 0  # cluster 1's grid on [0, 50] has steps of 3.3: every input rounds to 0


def test_qat_recovers_accuracy_on_a_toy_task():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = (x[:, :4].sum(1) > 0).long()
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    mp.train.fit(model, [(x, y)], mp.train.supervised_loss, steps=200, lr=0.05)
    acc = lambda m: (m(x).argmax(1) == y).float().mean().item()  # noqa: E731
    float_acc = acc(model)
    ptq = copy.deepcopy(model)
    mp.quantize_(ptq, "int2:tensor")
    prepare_qat_(model, "int2:tensor", QATConfig(scales="learned"))
    mp.train.fit(model, [(x, y)], mp.train.supervised_loss, steps=150, lr=0.01)
    convert_(model.eval())
    assert acc(model) >= max(acc(ptq), float_acc - 0.05)


def test_abwr_penalty_hand_value():
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, -1.5, 0.25, -0.25]]))
    m = nn.Sequential(lin)
    prepare_qat_(m, "int1:g4")
    # |w| = .5 1.5 .25 .25, mean .625: mean of squared distances
    expected = ((0.5 - 0.625) ** 2 + (1.5 - 0.625) ** 2 + 2 * (0.25 - 0.625) ** 2) / 4
    assert abwr_penalty(m).item() == pytest.approx(expected)


def test_bad_configs_are_refused_and_leave_the_model_unchanged():
    m = net()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="learned scales need"):
        prepare_qat_(m, "mxfp4", QATConfig(scales="learned"))
    assert type(m.conv) is nn.Conv2d and all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="':static'"):
        prepare_qat_(m, mp.QuantConfig(weights="int4", activations="int8"), QATConfig(nnac_clusters=2), calib=CALIB)
    with pytest.raises(ValueError, match="calibration data"):
        prepare_qat_(m, mp.QuantConfig(weights="int4", activations="int8:static"), QATConfig(act_ranges="frozen"))
    with pytest.raises(ValueError, match="method must be"):
        QATConfig(method="dropout")
    with pytest.raises(ValueError, match="no QAT layer"):
        convert_(m)
    assert type(m.conv) is nn.Conv2d


def test_nan_weights_are_refused_by_layer_name():
    m = net()
    with torch.no_grad():
        m.head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer 'head' has NaN or infinite weights"):
        prepare_qat_(m, "int8")
    assert type(m.head) is nn.Linear and type(m.conv) is nn.Conv2d


def test_a_generator_calib_feeds_both_the_initialisation_and_the_ranges():
    """calib is read by the post-training initialisation and then by the static ranges: a generator once."""
    calib = [torch.randn(8, 16) for _ in range(3)]

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()

    config, qat = mp.QuantConfig(weights="int4", activations="int8:static"), QATConfig(init="gptq", act_ranges="frozen")
    a, b = make(), make()
    prepare_qat_(a, config, qat, calib=calib)
    prepare_qat_(b, config, qat, calib=(x for x in calib))
    x = torch.randn(5, 16)
    assert torch.equal(a(x), b(x))
    with pytest.raises(TypeError, match="wrap one batch as"):  # a tensor would have been cut into one-row batches
        prepare_qat_(make(), config, qat, calib=calib[0])
    used = (x for x in calib)
    list(used)
    with pytest.raises(ValueError, match="already used up"):
        prepare_qat_(make(), config, qat, calib=used)


def test_unconverted_qat_layers_are_refused_where_packed_layers_are_needed(tmp_path):
    """save, export, dequantize, quantize_ of a QAT layer and prepare_qat_ again name the QAT layer and say what to
    do (save had written a folder that load could not read; quantize_ had built a QAT-and-packed hybrid); other
    layers can still be quantized beside QAT ones, and after convert_ everything works."""
    m = net()
    prepare_qat_(m, mp.QuantConfig(weights="int4", include=["conv", "dw"]))
    for call in (lambda: mp.save(m, tmp_path / "q"), lambda: mp.dequantize(m),
                 lambda: mp.export(m, tmp_path / "q", format="onnx", example_inputs=batch(0)),
                 lambda: mp.quantize_(m, "int8")):
        with pytest.raises(ValueError, match="layer 'conv' is a QAT layer.*convert_"):
            call()
    with pytest.raises(ValueError, match="layer 'conv' is a QAT layer.*prepared already"):
        prepare_qat_(m, "int8")
    assert not (tmp_path / "q").exists() and type(m.head) is nn.Linear and isinstance(m.conv, QATConv2d)
    mp.quantize_(m, mp.QuantConfig(weights="int8", include=["head"]))  # the other layers: PTQ beside QAT
    convert_(m)
    mp.save(m, tmp_path / "q")
    assert isinstance(mp.load(tmp_path / "q", net()).conv, QuantConv2d)


def test_ranges_start_from_the_first_training_batch_without_calib():
    m = net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_qat_(m, mp.QuantConfig(weights="int8", activations="int8:static"))
    with pytest.raises(RuntimeError, match="never observed"):
        m(*batch(0))
    m.train()
    m(*batch(0))
    assert bool(m.head.input_quant.initialized)


def test_qat_can_start_from_gptq_codes_and_scales():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    calib = [torch.randn(32, 64) for _ in range(4)]
    gptq = copy.deepcopy(m)
    mp.quantize_(gptq, "int3:g16", calib=calib, method="gptq")
    mp.set_kernels(gptq, False)
    prepare_qat_(m, "int3:g16", QATConfig(init="gptq"), calib=calib)
    x = torch.randn(5, 64)
    assert torch.equal(m(x), gptq(x))  # the QAT forward starts exactly where GPTQ ended


def test_qat_from_awq_keeps_its_input_smoothing_through_convert():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    calib = [torch.randn(32, 64) * torch.linspace(0.1, 10, 64) for _ in range(4)]
    awq = copy.deepcopy(m)
    mp.quantize_(awq, "int4:g16", calib=calib, method="awq")
    mp.set_kernels(awq, False)
    prepare_qat_(m, "int4:g16", QATConfig(init="awq"), calib=calib)
    assert hasattr(m[0], "input_smooth")
    x = calib[0][:5]
    assert torch.equal(m(x), awq(x))
    train_a_little_mlp = mp.train.fit(m, [(x, torch.zeros(5, dtype=torch.long))], mp.train.supervised_loss, steps=2)
    assert train_a_little_mlp["steps"] == 2
    assert_convert_keeps_outputs(m.eval(), x)
    assert torch.equal(m[0].input_smooth, awq[0].input_smooth)


def test_set_observing_freezes_ranges_in_training_mode():
    from modelpress.train import set_observing

    m = net()
    prepare_qat_(m, mp.QuantConfig(weights="int8", activations="int8:static"), calib=CALIB)
    m.train()
    hi = m.head.input_quant.hi.clone()
    set_observing(m, False)
    m(batch(20)[0] * 5, batch(20)[1])
    assert torch.equal(m.head.input_quant.hi, hi)
    set_observing(m, True)
    m(batch(20)[0] * 5, batch(20)[1])
    assert not torch.equal(m.head.input_quant.hi, hi)


class Mixed(nn.Module):
    """An embedding tied to the output head, and a MultiheadAttention (no QAT layer for it)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 12, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(self.attn(h, h, h, need_weights=False)[0] + h)


def test_unsupported_layers_stay_float_and_tied_users_each_get_a_qat_layer():
    torch.manual_seed(0)
    m = Mixed().eval()
    with pytest.warns(UserWarning) as rec:
        prepare_qat_(m, "int4:g8")
    text = " ".join(str(w.message) for w in rec)
    assert "attn (MultiheadAttention has no QAT layer" in text and "attn.out_proj" in text
    assert "stored once per user" in text
    assert isinstance(m.emb, QATEmbedding) and isinstance(m.head, QATLinear) and m.head.weight is m.emb.weight
    assert type(m.attn) is nn.MultiheadAttention and type(m.attn.out_proj) is not QATLinear
    ids = torch.randint(0, 12, (3, 5))
    assert_convert_keeps_outputs(m, ids)


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12))
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.body(x))


def seq_models():
    torch.manual_seed(0)
    flat = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    torch.manual_seed(0)
    nested = nn.Sequential(nn.Sequential(nn.Linear(6, 12), nn.ReLU()), nn.Linear(12, 3))
    torch.manual_seed(0)
    return {"sequential": flat, "nested sequential": nested, "sequential in a module": Wrapped()}


SEQ_CALIB = [torch.randn(8, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]


@pytest.mark.parametrize("kind", list(seq_models()))
def test_nnac_on_sequential_models_converts_and_reloads_bit_exactly(kind, tmp_path):
    m = seq_models()[kind].eval()
    linears = [n for n, c in m.named_modules() if isinstance(c, nn.Linear)]
    size = len(m) if isinstance(m, nn.Sequential) else None
    prepare_qat_(m, mp.QuantConfig(weights="int4", activations="int4:static"), QATConfig(nnac_clusters=2),
                 calib=SEQ_CALIB)
    router = getattr(m, ATTR)
    assert isinstance(router, NNACRouter) and router.layers == linears
    if size is not None:  # a container keeps its own layers (the router is not one of them)
        assert len(m) == size and ATTR not in m._modules
    assert {f"{ATTR}.centroids", f"{ATTR}.lo", f"{ATTR}.hi", f"{ATTR}.seen"} <= set(m.state_dict())
    m.train()
    lo = router.lo.clone()
    for x in SEQ_CALIB:
        m(x + 1)  # training mode reaches the router: its ranges move
    assert router.training and not torch.equal(router.lo, lo)
    m.eval()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(9))
    fake = assert_convert_keeps_outputs(m, x)
    mp.save(m, tmp_path / "out")
    shown, saved = mp.inspect(m), mp.inspect_saved(tmp_path / "out")  # the router's tensors are counted in both
    assert ATTR in {r.name.rpartition(".")[2] for r in shown.rows}
    assert (shown.total_bytes, shown.total_params) == (saved.total_bytes, saved.total_params)
    loaded = mp.load(tmp_path / "out", seq_models()[kind])
    mp.set_kernels(loaded, False)
    assert torch.equal(getattr(loaded, ATTR).lo, router.lo) and torch.equal(getattr(loaded, ATTR).centroids,
                                                                          router.centroids)
    with torch.no_grad():
        assert torch.equal(loaded(x), fake)


def test_nnac_on_a_sequential_state_dict_round_trip_and_observing():
    from modelpress.train import set_observing

    m = seq_models()["sequential"].eval()
    prepare_qat_(m, mp.QuantConfig(weights="int8", activations="int8:static"), QATConfig(nnac_clusters=2),
                 calib=SEQ_CALIB)
    router = getattr(m, ATTR)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        router.lo.add_(1.0)
    m.load_state_dict(sd)  # strict: the router's entries are neither missing nor unexpected
    assert torch.equal(router.lo, sd[f"{ATTR}.lo"])
    bad = dict(sd)
    del bad[f"{ATTR}.hi"]
    with pytest.raises(RuntimeError, match=f"Missing key.*{ATTR}.hi"):
        m.load_state_dict(bad)
    set_observing(m, False)
    assert router.observing is False
    m.train()
    m(SEQ_CALIB[0] + 5)
    assert torch.equal(router.lo, sd[f"{ATTR}.lo"])  # frozen ranges


def test_failed_nnac_on_a_sequential_leaves_it_as_it_was():
    m = seq_models()["sequential"]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    config, qat = mp.QuantConfig(weights="int4", activations="int8:static"), QATConfig(nnac_clusters=2)
    with pytest.raises(ValueError, match="calib is empty"):  # refused before any work
        prepare_qat_(m, config, qat, calib=[])
    with pytest.raises((RuntimeError, ValueError)):  # a batch of no rows: NNAC fails after the layers were swapped
        prepare_qat_(m, config, qat, calib=[torch.randn(0, 6)])
    assert [type(c) for c in m] == [nn.Linear, nn.ReLU, nn.Linear] and not hasattr(m, ATTR)
    assert not m._forward_pre_hooks and not m._state_dict_hooks and not m._load_state_dict_pre_hooks
    assert m.state_dict().keys() == before.keys() and all(torch.equal(m.state_dict()[k], v) for k, v in before.items())


def test_nnac_calibration_and_training_pass_over_a_batch_of_no_samples():
    """A calibration or training batch of zero rows adds nothing (it failed in torch's reshape): the ranges and
    centroids are those of the other batches, and the model still runs on zero rows."""
    kw = dict(calib=SEQ_CALIB)
    a, b = seq_models()["sequential"], seq_models()["sequential"]
    cfg, qat = mp.QuantConfig(weights="int4", activations="int4:static"), QATConfig(nnac_clusters=2)
    prepare_qat_(a, cfg, qat, **kw)
    prepare_qat_(b, cfg, qat, calib=SEQ_CALIB[:2] + [torch.zeros(0, 6)] + SEQ_CALIB[2:])
    ra, rb = getattr(a, ATTR), getattr(b, ATTR)
    for name in ("centroids", "lo", "hi", "seen"):
        assert torch.equal(getattr(ra, name), getattr(rb, name)), name
    b.train()
    before = rb.lo.clone(), rb.hi.clone()
    assert b(torch.zeros(0, 6)).shape == (0, 3)
    assert torch.equal(rb.lo, before[0]) and torch.equal(rb.hi, before[1])  # nothing learned from no samples
    b(SEQ_CALIB[0]).sum().backward()
