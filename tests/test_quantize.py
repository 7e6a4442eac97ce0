"""quantize_: which layers are swapped, which stay float (and are warned about), mixed precision, static
activations, refusal of NaN weights without touching the model, and outputs close to the float model."""
import copy
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modelpress as mp
from modelpress import QuantConfig, quantize_
from modelpress.algorithms import rtn
from modelpress.formats import quantize_tensor
from modelpress.quant import QuantMixin

QUANT_TYPE = {"emb": mp.QuantEmbedding, "bag": mp.QuantEmbeddingBag, "fc": mp.QuantLinear, "conv1": mp.QuantConv1d,
              "conv2": mp.QuantConv2d, "dw": mp.QuantConv2d, "head": mp.QuantLinear}
UNSUPPORTED = ("deconv", "bil")


class Tiny(nn.Module):
    """Every supported layer type (grouped and depthwise convolutions too) plus two unsupported ones."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.bag = nn.EmbeddingBag(32, 16, mode="mean")
        self.fc = nn.Linear(16, 32)
        self.conv1 = nn.Conv1d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.deconv = nn.ConvTranspose2d(16, 4, 2, stride=2)
        self.bil = nn.Bilinear(16, 16, 8)
        self.head = nn.Linear(64, 8)

    def forward(self, idx, img):  # idx [B, T] int64, img [B, 8, 6, 6] -> [B, ...]
        e = self.emb(idx).mean(1)  # [B, 16]
        b = self.bag(idx)  # [B, 16]
        h = F.relu(self.fc(e + b))  # [B, 32]
        s = self.conv1(h.view(-1, 4, 8)).flatten(1)  # [B, 64]
        c = self.deconv(self.dw(F.relu(self.conv2(img))))  # [B, 4, 12, 12]
        return torch.cat([self.head(s), c.flatten(1), self.bil(e, b)], 1)


def make_model(seed=0):
    torch.manual_seed(seed)
    return Tiny().eval()


def inputs(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 32, (3, 5), generator=g), torch.randn(3, 8, 6, 6, generator=g)) for _ in range(n)]


def cosine(a, b):
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def quantize_warned(model, config, **kw):
    with pytest.warns(UserWarning) as rec:
        quantize_(model, config, **kw)
    return [str(w.message) for w in rec]


def test_supported_swapped_unsupported_warned():
    m = make_model()
    ref = copy.deepcopy(m)
    deconv, bil = m.deconv, m.bil
    msgs = quantize_warned(m, QuantConfig(weights="int8"))
    assert len(msgs) == 1
    assert msgs[0].startswith("2 layer(s) stay float")
    assert "deconv (ConvTranspose2d is not a supported layer type)" in msgs[0]
    assert "bil (Bilinear is not a supported layer type)" in msgs[0]
    for name, cls in QUANT_TYPE.items():
        assert type(getattr(m, name)) is cls, name
        assert str(getattr(m, name).weight_format) == "int8"
    assert m.deconv is deconv and m.bil is bil
    assert torch.equal(m.deconv.weight, ref.deconv.weight)
    assert (m.dw.groups, m.conv2.groups) == (16, 2)
    with torch.no_grad():
        for x in inputs(2):
            assert cosine(m(*x), ref(*x)) >= 0.999


def test_warning_match_names():
    with pytest.warns(UserWarning, match=r"deconv .*; bil "):
        quantize_(make_model(), "int8")


@pytest.mark.parametrize("spec, floor", [("int8", 0.999), ("int8:tensor", 0.995), ("int4:g32", 0.99),
                                         ("fp8_e4m3", 0.995), ("mxfp8", 0.995), ("nvfp4", 0.98)])
def test_outputs_close_to_float(spec, floor):
    m, ref = make_model(), make_model()
    quantize_(m, QuantConfig(weights=spec, exclude=UNSUPPORTED))
    assert sum(isinstance(x, QuantMixin) for x in m.modules()) == 7
    with torch.no_grad():
        c = min(cosine(m(*x), ref(*x)) for x in inputs(3))
    assert floor <= c < 1.0  # close, and something really was quantized


def test_string_config_and_bad_config_type():
    m = make_model()
    with pytest.warns(UserWarning, match="deconv"):
        assert quantize_(m, "int4:g32") is m
    assert str(m.fc.weight_format) == "int4:g32"
    with pytest.raises(TypeError, match="QuantConfig or a format spec"):
        quantize_(make_model(), {"weights": "int8"})


def test_include_exclude():
    m = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_(m, QuantConfig(weights="int8", include=["fc", "re:conv\\d"]))
    assert [n for n, x in m.named_modules() if isinstance(x, QuantMixin)] == ["fc", "conv1", "conv2"]
    m = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_(m, QuantConfig(weights="int8", exclude=["emb", "bag", "deconv", "bil"]))
    assert [n for n, x in m.named_modules() if isinstance(x, QuantMixin)] == ["fc", "conv1", "conv2", "dw", "head"]
    m = make_model()
    with pytest.raises(ValueError, match=r"include pattern\(s\) \['nothing.\*'\] match no layer"):
        quantize_(m, QuantConfig(weights="int8", include=["nothing.*"]))
    assert not any(isinstance(x, QuantMixin) for x in m.modules())
    with pytest.warns(UserWarning, match="selected no layer"):  # patterns that match, but no weight to quantize
        quantize_(make_model(), QuantConfig(weights="int8", include=["bil", "deconv"], exclude=["bil", "deconv"]))


def test_mixed_precision_overrides():
    m, ref = make_model(), make_model()
    cfg = QuantConfig(weights="int8", exclude=UNSUPPORTED,
                      overrides={"fc": "int4:g32:asym", "re:conv\\d": "fp8_e4m3", "head": None, "emb": "mxfp4"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an override of None keeps the layer float without a warning
        quantize_(m, cfg)
    formats = {n: str(x.weight_format) for n, x in m.named_modules() if isinstance(x, QuantMixin)}
    assert formats == {"emb": "mxfp4", "bag": "int8", "fc": "int4:g32:asym", "conv1": "fp8_e4m3",
                       "conv2": "fp8_e4m3", "dw": "int8"}
    assert type(m.head) is nn.Linear and torch.equal(m.head.weight, ref.head.weight)
    assert m.fc.weight_zero.dtype == torch.uint8  # asymmetric zero points stored


def test_override_none_on_unsupported_layer_is_silent():
    m = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_(m, QuantConfig(weights="int8", overrides={"deconv": None, "bil": None}))
    assert type(m.deconv) is nn.ConvTranspose2d and type(m.fc) is mp.QuantLinear


def test_weights_none_with_overrides_only_touches_overridden_layers():
    m = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_(m, QuantConfig(weights=None, overrides={"fc": "int8"}))
    assert [n for n, x in m.named_modules() if isinstance(x, QuantMixin)] == ["fc"]


def test_activation_only_config_warns_for_layers_without_weight_format():
    m = make_model()
    msgs = quantize_warned(m, QuantConfig(weights=None, activations="int8", exclude=UNSUPPORTED))
    assert "activation-only quantization needs a weight format" in msgs[0]
    assert not any(isinstance(x, QuantMixin) for x in m.modules())


@pytest.mark.parametrize("calib", [None, []])
def test_static_activations_need_calibration(calib):
    m = make_model()
    before = {n: type(x) for n, x in m.named_modules()}
    with pytest.raises(ValueError, match="calib" if calib is None else "empty"):
        quantize_(m, QuantConfig(weights="int8", activations="int8:static", exclude=UNSUPPORTED), calib=calib)
    assert {n: type(x) for n, x in m.named_modules()} == before


@pytest.mark.parametrize("observer", ["minmax", "ema", "percentile", "mse"])
def test_static_int8_act_observers(observer):
    m, ref = make_model(), make_model()
    cfg = QuantConfig(weights="int8", activations="int8:static", exclude=UNSUPPORTED, act_observer=observer)
    quantize_(m, cfg, calib=inputs(4))
    for name in ("fc", "conv1", "conv2", "dw", "head"):
        layer = getattr(m, name)
        assert str(layer.act) == "int8:static"
        assert layer.input_scale.item() > 0 and layer.input_scale.item() != 1.0
        assert 0 <= layer.input_zero.item() <= 255 and layer.input_zero.item() == round(layer.input_zero.item())
    assert m.emb.act is None and not hasattr(m.emb, "input_scale")
    with torch.no_grad():
        assert min(cosine(m(*x), ref(*x)) for x in inputs(2, seed=7)) >= 0.99


def test_static_minmax_scale_is_exact_range():
    m = make_model()
    calib = inputs(3)
    quantize_(m, QuantConfig(weights="int8", activations="int8:static", include=["conv2"]), calib=calib)
    lo = min(x[1].min().item() for x in calib)
    hi = max(x[1].max().item() for x in calib)
    assert m.conv2.input_scale.item() == pytest.approx((hi - lo) / 255, rel=1e-6)
    assert m.conv2.input_zero.item() == round(-lo / ((hi - lo) / 255))


@pytest.mark.parametrize("act", ["int8", "fp8_e4m3", "fp8_e4m3:static"])
def test_other_activation_formats(act):
    m, ref = make_model(), make_model()
    quantize_(m, QuantConfig(weights="int8", activations=act, exclude=UNSUPPORTED), calib=inputs(2))
    assert str(m.fc.act) == act and m.bag.act is None
    with torch.no_grad():
        assert min(cosine(m(*x), ref(*x)) for x in inputs(2, seed=7)) >= 0.99


def test_nan_weight_refused_model_unchanged():
    m = make_model()
    with torch.no_grad():
        m.dw.weight[3, 0, 1, 1] = float("nan")
    before = {n: x for n, x in m.named_modules()}
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"'dw'.*NaN"):
        quantize_(m, QuantConfig(weights="int8", exclude=UNSUPPORTED))
    assert {n: x for n, x in m.named_modules()} == before  # no layer swapped, not even those before 'dw'
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]) or (torch.isnan(v).any() and torch.equal(v.nan_to_num(), state[k].nan_to_num()))


@pytest.mark.parametrize("method, act", [("gptq", None), ("awq", None), ("adaround", None),
                                         ("smoothquant", "int8"), ("rtn", "int8:static")])
def test_nan_calibration_inputs_refused_naming_the_layer_model_unchanged(method, act):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    state = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match=r"layer '0': .*NaN or infinite"):
        quantize_(m, QuantConfig(weights="int8", activations=act), calib=[torch.full((4, 16), float("nan"))],
                  method=method)
    assert all(type(x) is nn.Linear for x in (m[0], m[2]))
    assert m.state_dict().keys() == state.keys() and all(torch.equal(v, state[k]) for k, v in m.state_dict().items())


def test_unknown_method():
    m = make_model()
    with pytest.raises(ValueError, match=r"unknown quantization method 'gptqq'.*rtn"):
        quantize_(m, "int8", method="gptqq")
    assert not any(isinstance(x, QuantMixin) for x in m.modules())


def test_method_as_config_object():
    m = make_model()
    with pytest.warns(UserWarning):
        quantize_(m, "int8", method=rtn.Config())
    assert type(m.fc) is mp.QuantLinear
    with pytest.raises(TypeError, match="rtn.Config"):
        quantize_(make_model(), "int8", method=SimpleNamespace(method="rtn"))


def test_failure_midway_restores_the_model(monkeypatch):
    m = make_model()
    before = dict(m.named_modules())
    calls = []

    def flaky(w, fmt, mse=None):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("boom")
        return quantize_tensor(w, fmt, mse=mse)

    monkeypatch.setattr(rtn, "quantize_tensor", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        quantize_(m, QuantConfig(weights="int8", exclude=UNSUPPORTED))
    assert len(calls) == 4 and dict(m.named_modules()) == before  # the 3 layers already swapped are put back


def test_weight_observer_mse_not_worse_than_minmax():
    errs = {}
    for obs in ("minmax", "mse"):
        m, ref = make_model(), make_model()
        quantize_(m, QuantConfig(weights="int3:g16", include=["head"], weight_observer=obs))
        errs[obs] = (m.head.dequantized_weight() - ref.head.weight).pow(2).sum().item()
    assert errs["mse"] <= errs["minmax"]


def test_progress_and_training_flag():
    m = make_model().train()
    seen = []
    quantize_(m, QuantConfig(weights="int8", exclude=UNSUPPORTED), progress=lambda *a: seen.append(a))
    assert [a for a in seen if a[0] == "quantize"] == [("quantize", i, 7) for i in range(1, 8)]
    assert m.fc.training


def test_quantize_twice_leaves_quantized_layers():
    m = make_model()
    quantize_(m, QuantConfig(weights="int8", exclude=UNSUPPORTED))
    fc = m.fc
    with pytest.warns(UserWarning, match=r"selected no layer to quantize: the 7 quantized layer\(s\) are quantized "
                                         "already"):
        quantize_(m, QuantConfig(weights="int4:g32", exclude=UNSUPPORTED))
    assert m.fc is fc and str(fc.weight_format) == "int8"


@pytest.mark.parametrize("method", ["gptq", "awq", "adaround"])
def test_layers_the_calibration_never_runs_get_round_to_nearest_and_a_warning(method):
    """an unused head, MultiheadAttention's out_proj (the attention reads its weight itself): AWQ and AdaRound
    refused the whole model ("left layers unquantized"), GPTQ rounded them silently"""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.aux = nn.Linear(32, 32), nn.Linear(32, 8)
            self.att = nn.MultiheadAttention(32, 4, batch_first=True)

        def forward(self, x, aux=False):
            y = self.att(self.a(x), x, x)[0]
            return self.aux(y) if aux else y

    torch.manual_seed(0)
    m = M().eval()
    aux = m.aux.weight.detach().clone()
    with pytest.warns(UserWarning, match=f"never ran on the calibration data and got round-to-nearest instead of "
                                         f"{method}: aux"):
        mp.quantize_(m, "int4:g32", calib=[torch.randn(2, 5, 32)], method=method)
    assert isinstance(m.aux, mp.QuantLinear) and isinstance(m.att.out_proj, mp.QuantLinear)
    assert torch.equal(m.aux.weight_codes, mp.formats.quantize_tensor(aux, "int4:g32").codes)
