"""prune_: every method on small models and a tiny Llama, sparse storage (bytes, inspect, save/load bit-exact,
dequantize), quantize_ after prune_ (GPTQ keeps pruned weights at zero, kernels agree), input checks and
rollback."""
import copy
import warnings

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.formats.sparse import satisfies, unpack_mask
from modelpress.prune import sparsity_summary
from modelpress.quant import QuantMixin

from helpers import mlp, outlier_inputs, rel_err


def calib(n=4, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, k, generator=g) for _ in range(n)]


def dense_weights(model):
    return {n: m for n, m in mp.dequantize(model).named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("target", [{"sparsity": 0.5}, {"pattern": "2:4"}])
def test_methods_patterns_and_storage(method, target, tmp_path):
    ref = mlp()
    model = copy.deepcopy(ref)
    mp.prune_(model, mp.PruneConfig(method=method, **target), calib=calib())
    for name in ("0", "2"):
        m = model.get_submodule(name)
        assert isinstance(m, mp.QuantLinear) and str(m.weight_format) == "fp32"
        keep = unpack_mask(m.weight_mask, m.weight_shape)
        w = m.dequantized_weight()
        assert (w[~keep] == 0).all()
        if "pattern" in target:
            assert satisfies(keep, 2, 4)
        else:
            assert keep.float().mean() == pytest.approx(0.5, abs=0.01)
    s = sparsity_summary(model)
    assert s["sparse_layers"] == 2 and s["sparsity"] == pytest.approx(0.5, abs=0.01)
    dense = sum(p.numel() * 4 for p in ref.parameters())
    assert mp.inspect(model).total_bytes < 0.6 * dense
    assert "sparse:50%" in str(mp.inspect(model))
    mp.save(model, tmp_path / "m")
    loaded = mp.load(tmp_path / "m", mlp())
    x = calib(seed=5)[0]
    assert torch.equal(loaded(x), model(x))
    assert mp.inspect_saved(tmp_path / "m").total_bytes == mp.inspect(model).total_bytes
    plain = mp.dequantize(model)
    assert type(plain[0]) is nn.Linear and torch.equal(plain(x), model(x))


def test_data_driven_methods_beat_magnitude():
    ref = mlp()
    x = outlier_inputs(t=256, k=64)  # a few loud input channels, as in trained transformers
    data, test = list(x[:192].split(32)), [x[192:]]
    errs = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        m = copy.deepcopy(ref)
        mp.prune_(m, mp.PruneConfig(pattern="2:4", method=method), calib=data)
        errs[method] = rel_err(m, ref, test)
    assert errs["sparsegpt"] < errs["wanda"] < errs["magnitude"], errs


def test_quantize_after_prune_keeps_zeros_and_gptq_compensates(tmp_path):
    ref = mlp()
    x = outlier_inputs(t=512, k=64)
    data, test = list(x[:384].split(32)), [x[384:]]
    pruned = copy.deepcopy(ref)
    mp.prune_(pruned, mp.PruneConfig(pattern="2:4", method="sparsegpt"), calib=data)
    masks = {n: unpack_mask(m.weight_mask, m.weight_shape) for n, m in pruned.named_modules()
             if isinstance(m, QuantMixin)}
    errs = {}
    for method in ("rtn", "gptq"):
        q = copy.deepcopy(pruned)
        mp.quantize_(q, mp.QuantConfig(weights="int4:g32"), calib=data, method=method)
        for name, keep in masks.items():
            m = q.get_submodule(name)
            assert str(m.weight_format) == "int4:g32" and hasattr(m, "weight_mask")
            assert torch.equal(unpack_mask(m.weight_mask, m.weight_shape), keep)
            assert (m.dequantized_weight()[~keep] == 0).all()
        errs[method] = rel_err(q, pruned, test)  # the quantization error on top of pruning
        if method == "gptq":
            mp.save(q, tmp_path / "q")
            x = calib(seed=4)[0]
            assert torch.equal(mp.load(tmp_path / "q", mlp())(x), q(x))
            assert mp.inspect(q).total_bytes < 0.17 * sum(p.numel() * 4 for p in ref.parameters()) + 600  # + biases
    assert errs["gptq"] < errs["rtn"], errs


@pytest.mark.parametrize("spec", ["int4:g32", "int8", "int4:g32:asym"])
def test_sparse_layers_kernels_match_reference(spec):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64)).eval()
    mp.prune_(model, mp.PruneConfig(pattern="2:4"))
    mp.quantize_(model, spec)
    x = torch.randn(4, 128)
    fast = model(x)
    mp.set_kernels(model, False)
    ref = model(x)
    assert torch.allclose(fast, ref, atol=2e-2, rtol=2e-2)


def test_conv_layers_and_skips():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    data = [torch.randn(4, 1, 8, 8) for _ in range(2)]
    with pytest.warns(UserWarning, match="not a multiple of 4"):  # the first conv has 9 inputs per output
        mp.prune_(model, mp.PruneConfig(pattern="2:4", method="sparsegpt"), calib=data)
    assert type(model[0]) is nn.Conv2d and isinstance(model[2], mp.QuantConv2d)
    assert satisfies(unpack_mask(model[2].weight_mask, model[2].weight_shape), 2, 4)
    # per-layer targets: overrides win over the default, None keeps a layer dense
    m2 = mlp()
    mp.prune_(m2, mp.PruneConfig(sparsity=0.5, overrides={"2": "4:8", "0": None}))
    assert type(m2[0]) is nn.Linear and satisfies(unpack_mask(m2[2].weight_mask, (32, 128)), 4, 8)
    m3 = mlp()  # a sparsity of 0 keeps a layer dense as None does (stored sparse, it only added a full bitmask)
    mp.prune_(m3, mp.PruneConfig(sparsity=0.5, overrides={"0": 0.0}))
    assert type(m3[0]) is nn.Linear and isinstance(m3[2], mp.QuantLinear)


def test_checks_and_rollback():
    with pytest.raises(ValueError, match="either sparsity"):
        mp.PruneConfig(sparsity=0.5, pattern="2:4")
    for nothing in ({}, {"sparsity": 0.0}, {"sparsity": 0, "overrides": {"0": 0.0, "2": None}}):
        with pytest.raises(ValueError, match="prunes nothing"):
            mp.PruneConfig(**nothing)
    with pytest.raises(ValueError, match="unknown pruning method"):
        mp.PruneConfig(sparsity=0.5, method="random")
    with pytest.raises(ValueError, match="block_size"):
        mp.PruneConfig(sparsity=0.5, method="sparsegpt", method_options={"block_size": "x"})
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        mp.PruneConfig(sparsity=1.5)
    model = mlp()
    with pytest.raises(ValueError, match="calibration data"):
        mp.prune_(model, mp.PruneConfig(sparsity=0.5, method="wanda"))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="first batch does not run"):  # checked before any work
        mp.prune_(model, mp.PruneConfig(sparsity=0.5, method="sparsegpt"), calib=[torch.randn(4, 7)])
    bad = [torch.randn(4, 64), torch.randn(4, 7)]  # the second batch has the wrong width: fails inside the run
    with pytest.raises(RuntimeError):
        mp.prune_(model, mp.PruneConfig(sparsity=0.5, method="sparsegpt"), calib=bad)
    assert all(type(m) is nn.Linear for m in (model[0], model[2]))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    q = mlp()
    mp.quantize_(q, "int8")
    with pytest.warns(UserWarning) as caught:
        mp.prune_(q, 0.5)
    assert any("prune before quantizing" in str(w.message) for w in caught)
    assert not any("selected no layer" in str(w.message) for w in caught)  # (the reason is given: not the patterns)


def overflowing_mlp():
    """mlp() whose first layer turns finite inputs into infinite outputs."""
    model = mlp()
    with torch.no_grad():
        model[0].weight.fill_(1e38)
    return model


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("build, data, layer", [
    (mlp, [torch.full((4, 64), float("nan"))], "0"),
    (mlp, [torch.randn(4, 64), torch.randn(4, 64).index_fill_(1, torch.tensor([5]), float("inf"))], "0"),
    (overflowing_mlp, [torch.ones(4, 64)], "2"),  # layer 0 was pruned first: rolled back
])
def test_non_finite_calibration_inputs_are_refused_model_unchanged(method, build, data, layer):
    model = build()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=rf"layer '{layer}': its calibration inputs contain NaN or infinite"):
        mp.prune_(model, mp.PruneConfig(sparsity=0.5, method=method), calib=data)
    assert all(type(m) is nn.Linear for m in (model[0], model[2]))
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_pruning_again_keeps_earlier_zeros():
    model = mlp()
    mp.prune_(model, 0.5)
    first = unpack_mask(model[0].weight_mask, (128, 64))
    mp.prune_(model, mp.PruneConfig(pattern="2:4", method="wanda"), calib=calib())
    second = unpack_mask(model[0].weight_mask, (128, 64))
    assert not (second & ~first).any() and satisfies(second, 2, 4)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_model_in_training_mode_keeps_its_batchnorm_statistics(method):
    """The calibration passes run in eval mode: a model left in training mode keeps its BatchNorm statistics and
    its flags, after a pruning and after a pruning that failed on a later batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 10)).train()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "batches" in k}
    data = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    for batches in (data, data[:2] + [torch.randn(4, 5, 8, 8)]):  # the second fails on its last batch
        m = copy.deepcopy(model)
        try:
            mp.prune_(m, mp.PruneConfig(sparsity=0.5, method=method), calib=batches)
        except RuntimeError:
            assert batches is not data
        assert all(torch.equal(m.state_dict()[k], v) for k, v in stats.items())
        assert all(x.training for x in m.modules())


def test_gpt2_conv1d_layers_are_pruned_and_a_tied_head_is_left_whole(tmp_path):
    """transformers' Conv1D (GPT-2) is pruned as the Linear it is (N:M groups along its inputs) and stays a Conv1D
    for its users and after dequantize; lm_head, tied to the token embedding, is left whole and named (pruning it
    would store the weight twice), as are layers prune_ does not handle."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = [torch.randint(0, 64, (2, 16)) for _ in range(2)]
    with pytest.warns(UserWarning, match=r"lm_head \(its weight is tied to transformer.wte's"):
        mp.prune_(model, mp.PruneConfig(pattern="2:4", method="wanda"), calib=ids)
    attn = model.transformer.h[0].attn.c_attn
    assert type(attn).__name__ == "QuantHFConv1D" and attn.weight.shape == (32, 96)  # [in, out], as Conv1D's
    assert satisfies(attn.weight.t() != 0, 2, 4)  # 2 of every 4 inputs of each output kept
    assert model.lm_head.weight is model.transformer.wte.weight and sparsity_summary(model)["sparse_layers"] == 8
    with torch.no_grad():
        y = model(ids[0]).logits
    mp.save(model, tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(mp.load(tmp_path / "m")(ids[0]).logits, y)
    plain = mp.dequantize(model)
    assert type(plain.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    lstm = nn.Sequential(nn.Linear(8, 8), nn.LSTM(8, 8))
    with pytest.warns(UserWarning, match=r"1 \(LSTM is not a layer prune_ handles"):
        mp.prune_(lstm, 0.5)


def test_a_module_registered_twice_is_pruned_once_and_stays_shared():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), nn.Sequential(shared))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "tied" warning: one module object is one user
        mp.prune_(model, 0.5)
    assert isinstance(model[0], QuantMixin) and model[2][0] is model[0]
