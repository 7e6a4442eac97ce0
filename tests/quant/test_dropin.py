"""Quantized layers are drop-in: `.weight` (decoded on access), `isinstance`, the float module's attributes and
subclass behaviour, the float dtype; dtype changes keep codes and scales; dequantize rebuilds the float class."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modelpress as mp
from modelpress.formats import dequantize_tensor
from modelpress.quant import QuantMixin, quant_class, set_kernels


class ScaledEmbedding(nn.Embedding):
    """Like BART's scaled word embedding: a subclass whose forward calls nn.Embedding's and rescales."""

    def __init__(self, n, d, scale):
        super().__init__(n, d)
        self.scale = scale

    def forward(self, idx):
        return super().forward(idx) * self.scale


class ReadsWeight(nn.Embedding):
    """Like Whisper's positional embedding: indexes `self.weight` itself."""

    def forward(self, n: int):
        return self.weight[:n]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = ScaledEmbedding(40, 32, 2.5)
        self.pos = ReadsWeight(16, 32)
        self.bag = nn.EmbeddingBag(40, 32, mode="sum")
        self.fc = nn.Linear(32, 48)
        self.conv = nn.Conv1d(4, 8, 3)

    def forward(self, idx):  # idx [B, 8]
        h = self.emb(idx) + self.pos(idx.shape[1])  # [B, 8, 32]
        y = self.fc(h + self.bag(idx)[:, None])  # [B, 8, 48]
        # reads the layer's weight like T5 / ViT code does
        return self.conv(y.reshape(-1, 4, 12).to(self.conv.weight.dtype)).flatten(1)


def make(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


IDX = torch.randint(0, 40, (3, 8), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fmt", ["int8", "int4:g32", "nvfp4"])
def test_weight_is_decoded_on_access_and_float_attributes_answer(fmt):
    f = make()
    q = copy.deepcopy(f)
    mp.quantize_(q, mp.QuantConfig(weights=fmt))
    for name in ("emb", "pos", "bag", "fc", "conv"):
        fm, qm = getattr(f, name), getattr(q, name)
        assert isinstance(qm, QuantMixin) and isinstance(qm, type(fm)), name  # subclasses stay what they were
        w = qm.weight
        assert w.shape == fm.weight.shape and w.dtype == fm.weight.dtype and w.device == fm.weight.device
        assert torch.equal(w, dequantize_tensor(qm.qweight))
        assert "weight" not in dict(qm.named_parameters())  # no float copy is kept
    assert q.emb.scale == 2.5 and q.fc.in_features == 32 and q.fc.out_features == 48 and q.conv.kernel_size == (3,)
    assert q.bag.mode == "sum" and q.emb.padding_idx is None
    with torch.no_grad():
        set_kernels(q, False)
        ref = mp.dequantize(q)(IDX)  # the float model with the decoded weights
        assert torch.allclose(q(IDX), ref, atol=1e-5, rtol=1e-5)
        assert F.cosine_similarity(q(IDX).flatten(), f(IDX).flatten(), dim=0) > (0.999 if fmt == "int8" else 0.97)


def test_weight_cannot_be_assigned():
    q = mp.QuantLinear.from_float(nn.Linear(32, 16), "int8")
    with pytest.raises(AttributeError, match="computed from the packed codes"):
        q.weight = torch.zeros(16, 32)


def test_dequantize_rebuilds_the_float_classes_and_attributes():
    q = make()
    mp.quantize_(q, "int4:g32")
    d = mp.dequantize(q)
    assert type(d.emb) is ScaledEmbedding and d.emb.scale == 2.5 and type(d.pos) is ReadsWeight
    assert type(d.fc) is nn.Linear and type(d.conv) is nn.Conv1d and type(d.bag) is nn.EmbeddingBag
    assert not any(isinstance(m, QuantMixin) for m in d.modules())
    assert torch.equal(d.fc.weight, q.fc.weight) and torch.equal(d.fc.bias, q.fc.bias)
    set_kernels(q, False)
    with torch.no_grad():
        assert torch.allclose(d(IDX), q(IDX), atol=1e-5)


def test_subclass_that_computes_its_weight_is_not_replaced():
    lin = nn.utils.parametrizations.weight_norm(nn.Linear(8, 8))
    assert quant_class(lin) is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_changes_keep_codes_and_scales_and_reload_bit_exact(dtype, tmp_path):
    q = make()
    mp.quantize_(q, "int4:g32")
    packed = {k: v.clone() for k, v in q.state_dict().items() if k.rpartition(".")[2].startswith("weight_")}
    q.to(dtype)
    state = q.state_dict()
    for k, v in packed.items():  # the format's storage dtypes (uint8 codes, bf16 group scales) are untouched
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k
    assert q.fc.bias.dtype == dtype and q.fc.weight.dtype == dtype and q.emb.weight.dtype == dtype
    with torch.no_grad():
        y = q(IDX)
    assert y.dtype == dtype
    mp.save(q, tmp_path / "q")
    loaded = mp.load(tmp_path / "q", make(seed=3).to(dtype))
    with torch.no_grad():
        assert torch.equal(loaded(IDX), y)
    q.float()  # and back: the same values as never converted (bias round trip aside)
    assert q.fc.weight.dtype == torch.float32 and q.fc.weight_scale.dtype == torch.bfloat16


def test_float_dtype_of_a_half_model_is_remembered():
    torch.manual_seed(0)
    f = nn.Sequential(nn.Embedding(40, 32), nn.Linear(32, 16)).to(torch.bfloat16).eval()
    q = mp.quantize_(copy.deepcopy(f), "int8")
    idx = torch.randint(0, 40, (2, 5))
    with torch.no_grad():
        assert q[0](idx).dtype == torch.bfloat16 and q(idx).dtype == torch.bfloat16  # as the float model gave
    assert q[0].weight.dtype == q[1].weight.dtype == torch.bfloat16


@pytest.mark.parametrize("cls", [nn.Embedding, nn.EmbeddingBag])
@pytest.mark.parametrize("fmt", ["int4:g32", "int3", "int8"])  # int3 rows of 20 codes: the decode-all path
def test_negative_or_out_of_range_ids_are_refused(cls, fmt):
    q = quant_class(cls(100, 20)).from_float(cls(100, 20), fmt)
    for bad in ([-1], [100], [3, 250]):
        ids = torch.tensor([bad]) if cls is nn.EmbeddingBag else torch.tensor(bad)
        with pytest.raises(IndexError, match="out of range"):
            q(ids)
