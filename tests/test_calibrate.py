"""The calibration runner: calling a model on any input kind and observing layer inputs."""
import pytest
import torch
from torch import nn

from modelpress.calibrate import call_model, chained_blocks, find_blocks, observe_inputs, run_sequential
from modelpress.quant import Observer


class TwoIn(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x, y=None, scale=1.0):
        out = self.fc(x) * scale
        return out if y is None else out + y


def test_call_model_tensor_tuple_dict():
    torch.manual_seed(0)
    m = TwoIn()
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    ref = m.fc(x)
    assert torch.equal(call_model(m, x), ref)
    assert torch.equal(call_model(m, (x, y)), ref + y)
    assert torch.equal(call_model(m, [x, y]), ref + y)
    assert torch.equal(call_model(m, {"x": x, "y": y, "scale": 2.0}), ref * 2.0 + y)


def test_call_model_bad_input():
    with pytest.raises(TypeError, match="tensor, a tuple of tensors or a dict.*got int"):
        call_model(TwoIn(), 3)


def _observe(calib, kind="minmax", progress=None):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    return m, observe_inputs(m, {"0": m[0], "2": m[2]}, calib, lambda: Observer(kind), progress)


def test_observe_inputs_ranges():
    xs = [torch.tensor([[-2.0, 0.5, 1.0]]), torch.tensor([[0.0, 3.0, -1.0], [1.0, 1.0, 1.0]])]
    seen = []
    m, obs = _observe(xs, progress=seen.append)
    assert seen == [1, 2]
    lo, hi = obs["0"].range()
    assert (lo.item(), hi.item()) == (-2.0, 3.0)
    with torch.no_grad():
        h = torch.cat([m[1](m[0](x)) for x in xs])
    lo2, hi2 = obs["2"].range()
    assert lo2.item() == h.min().item() == 0.0  # after ReLU
    assert hi2.item() == h.max().item()
    assert not m[0]._forward_pre_hooks and not m[2]._forward_pre_hooks  # hooks removed


def test_observe_inputs_dict_batches():
    m = TwoIn()
    obs = observe_inputs(m, {"fc": m.fc}, [{"x": torch.full((2, 3), 5.0)}, {"x": torch.full((1, 3), -1.0)}],
                         Observer)
    assert [v.item() for v in obs["fc"].range()] == [-1.0, 5.0]


def test_observe_inputs_empty_or_missing():
    with pytest.raises(ValueError, match="empty"):
        _observe([])
    with pytest.raises(ValueError, match="empty"):
        _observe(iter(()))
    with pytest.raises(ValueError, match="calib"):
        _observe(None)


def test_observe_inputs_removes_hooks_on_error():
    m = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(RuntimeError):
        observe_inputs(m, {"0": m[0]}, [torch.randn(2, 5)], Observer)  # wrong width
    assert not m[0]._forward_pre_hooks


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x, attention_mask=None):
        return self.fc(x)


def test_run_sequential_refuses_non_finite_inputs_before_processing():
    x, mask = torch.randn(2, 4, 3), torch.ones(2, 4, dtype=torch.long)
    x[1, 3], mask[1, 3] = float("nan"), 0  # a padded token: not data, accepted
    seen = []
    run_sequential(Tokens(), [{"x": x, "attention_mask": mask}], ["fc"], lambda n, m, xs: seen.append(n))
    assert seen == ["fc"]
    for bad in (float("nan"), float("inf")):
        y = torch.randn(2, 4, 3)
        y[0, 1, 2] = bad
        seen.clear()
        with pytest.raises(ValueError, match=r"layer 'fc': its calibration inputs contain NaN or infinite values "
                                             r"\(calibration batch 1\)"):
            run_sequential(Tokens(), [{"x": x, "attention_mask": mask}, {"x": y, "attention_mask": mask}], ["fc"],
                           lambda n, m, xs: seen.append(n))
        assert seen == []


def test_observe_inputs_names_the_layer_with_nan_inputs():
    with pytest.raises(ValueError, match=r"layer '0': calibration activations contain NaN"):
        _observe([torch.full((2, 3), float("nan"))])


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(3))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


class Heads(nn.Module):
    """Parallel branches in a ModuleList: each reads the trunk's output, none reads its neighbour's."""
    def __init__(self, as_list=True):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(16, 16)
        heads = [nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)) for _ in range(3)]
        if as_list:
            self.heads = nn.ModuleList(heads)
        else:
            self.h0, self.h1, self.h2 = heads

    def forward(self, x):
        h = torch.relu(self.trunk(x))
        heads = self.heads if hasattr(self, "heads") else (self.h0, self.h1, self.h2)
        return sum(hd(h) for hd in heads)


class Fields(nn.Module):
    """One EmbeddingBag per field (a CTR model): a ModuleList that is not a chain, and whose outputs could not even
    be fed to the next bag."""
    def __init__(self):
        super().__init__()
        self.emb = nn.ModuleList(nn.EmbeddingBag(50, 8, mode="sum") for _ in range(3))
        self.top = nn.Linear(24, 1)

    def forward(self, ids):
        offsets = torch.arange(ids.shape[0])
        return self.top(torch.cat([e(ids[:, f].contiguous(), offsets) for f, e in enumerate(self.emb)], 1))


def test_chained_blocks_only_for_a_real_chain():
    x = torch.randn(4, 16)
    assert [n for n, _ in chained_blocks(Chain(), x)] == ["blocks.0", "blocks.1", "blocks.2"]
    assert len(find_blocks(Heads())) == 3 and chained_blocks(Heads(), x) == []
    assert chained_blocks(Fields(), torch.randint(0, 50, (4, 3))) == []


def test_parallel_branches_are_calibrated_on_their_own_inputs():
    """GPTQ on heads held in a ModuleList picks the codes it picks for the same heads held as attributes (before,
    head i + 1 was calibrated on head i's output), and a ModuleList of embedding bags calibrates at all."""
    import modelpress as mp

    calib = [torch.randn(32, 16, generator=torch.Generator().manual_seed(i)) * 3 for i in range(3)]
    a, b = Heads(as_list=True).eval(), Heads(as_list=False).eval()
    for m in (a, b):
        mp.quantize_(m, mp.QuantConfig(weights="int3"), calib=calib, method="gptq")
    for i, h in enumerate((b.h0, b.h1, b.h2)):
        assert torch.equal(a.heads[i][0].weight_codes, h[0].weight_codes)
        assert torch.equal(a.heads[i][2].weight_codes, h[2].weight_codes)
    f = Fields().eval()
    ids = [torch.randint(0, 50, (16, 3), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    mp.prune_(f, mp.PruneConfig(sparsity=0.5, method="wanda"), calib=ids)
    assert (f.top.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.05)


def test_a_cache_passed_to_blocks_by_position_is_dropped():
    """GPT-2 hands its DynamicCache to each block positionally: kept, it grew at every re-run of a block (padded
    batches failed with a shape error, unpadded ones calibrated on ever longer keys)"""
    transformers = pytest.importorskip("transformers")
    import copy

    import modelpress as mp

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, eos_token_id=0, bos_token_id=0)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, 6:] = 0
    calib = [{"input_ids": torch.randint(1, 128, (3, 12)), "attention_mask": mask}]
    a = mp.quantize_(copy.deepcopy(m), "int4:g32", calib=calib, method="gptq")
    b = copy.deepcopy(m)
    b.config.use_cache = False
    mp.quantize_(b, "int4:g32", calib=calib, method="gptq")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


class _Tagger(torch.nn.Module):
    """ids -> embedding -> Linear; the padding id's embedding is an outlier (as a trained pad row can be)"""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.fc = torch.nn.Linear(8, 8)
        with torch.no_grad():
            self.emb.weight[0] = 50.0

    def forward(self, input_ids, attention_mask=None):
        return self.fc(self.emb(input_ids))


@pytest.mark.parametrize("config", [dict(weights="int8", activations="int8:static"),
                                    dict(weights="int4:g8", method="adaround"), dict(weights="int8", method="awq"),
                                    dict(weights="int8", activations="int8:static", method="smoothquant")])
def test_padded_positions_are_not_calibration_data(config):
    """static input ranges, AdaRound, AWQ and SmoothQuant see the real tokens only (as GPTQ did): a padded batch
    and the same real tokens without padding calibrate the same layer"""
    import modelpress as mp

    torch.manual_seed(0)
    ids = torch.randint(1, 16, (2, 6))
    padded = torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(2, 6), torch.zeros(2, 4)], 1).long()
    a, b = _Tagger().eval(), _Tagger().eval()
    b.load_state_dict(a.state_dict())
    cfg = mp.QuantConfig(**{k: v for k, v in config.items() if k != "method"}, include=["fc"])
    method = config.get("method", "rtn")
    mp.quantize_(a, cfg, calib=[{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], method=method)
    mp.quantize_(b, cfg, calib=[{"input_ids": padded, "attention_mask": mask}], method=method)
    sa, sb = a.fc.state_dict(), b.fc.state_dict()
    assert sa.keys() == sb.keys() and all(torch.allclose(sa[k].float(), sb[k].float()) for k in sa)


def test_masks_apply_only_to_layers_laid_out_by_the_masked_tokens():
    """an encoder-decoder's decoder (its length may equal the source's) and a model fed pixels as well have inputs of
    the mask's [B, T] whose rows are other things: only the encoder's layers, or a text-only model's, are masked"""
    transformers = pytest.importorskip("transformers")
    from modelpress.calibrate import layer_masks

    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 4:] = 0
    ids = torch.randint(3, 50, (2, 6))
    bart = transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32))
    scope = layer_masks(bart, [{"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids}])
    assert len(scope("model.encoder.layers.0.fc1")) == 1 and scope("model.decoder.layers.0.fc1") == []
    text = layer_masks(torch.nn.Linear(4, 4), [{"input_ids": ids, "attention_mask": mask}])
    assert len(text("anything")) == 1
    pixels = layer_masks(torch.nn.Linear(4, 4), [{"input_ids": ids, "attention_mask": mask,
                                                  "pixel_values": torch.zeros(2, 3, 8, 8)}])
    assert pixels("text_model.encoder.layers.0.mlp.fc1") == []


def test_a_static_range_for_a_layer_the_calibration_never_runs_is_refused_by_name():
    import modelpress as mp

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.aux = torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)

        def forward(self, x, aux=False):
            return self.aux(self.a(x)) if aux else self.a(x)

    m = M()
    with pytest.raises(ValueError, match="aux never ran on the calibration data.*static input ranges"):
        mp.quantize_(m, mp.QuantConfig(weights="int8", activations="int8:static"), calib=[torch.randn(2, 8)])
    assert type(m.aux) is torch.nn.Linear and type(m.a) is torch.nn.Linear
