"""nn.MultiheadAttention (and TransformerEncoder's fast path) and LSTM/GRU/RNN with quantized weight matrices:
torch's own forward on the decoded weights, saved and reloaded bit-exactly, dequantized back to float classes."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modelpress as mp
from modelpress.formats import dequantize_tensor
from modelpress.quant import QuantGRU, QuantLinear, QuantLSTM, QuantMultiheadAttention, QuantRNN, set_kernels


def cos(a, b):
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def encoder(seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


X = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1))


def _fused(layer) -> bool:
    return bool(layer.activation_relu_or_gelu)  # the flag torch's fused inference path checks first


def test_quantized_encoder_layers_run_their_layers_forward(tmp_path):
    """torch's fused inference path (eval, no autograd) reads linear1.weight ... and skips the layers' forward: with
    modelpress layers inside, the encoder layers run their own forward, so activation quantization and QAT's fake
    quantization happen with autograd on or off; dequantize gives the fused path back."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    f = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x, pad = torch.randn(3, 7, 32) * 3, torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = pad[2, 3:] = True
    calib = [torch.randn(3, 7, 32) * 3 for _ in range(3)]
    assert all(_fused(m) for m in f.layers) and f.use_nested_tensor
    q = copy.deepcopy(f)
    mp.quantize_(q, mp.QuantConfig(weights="int4", activations="int4:static"), calib=calib)
    assert not any(_fused(m) for m in q.layers) and not q.use_nested_tensor
    set_kernels(q, False)  # (with autograd on the layers run the reference path: compare it with itself)
    with torch.no_grad():
        y, y_pad = q(x), q(x, src_key_padding_mask=pad)
    with torch.enable_grad():  # (attention runs torch's fused kernel without autograd: float rounding apart)
        torch.testing.assert_close(q(x).detach(), y, rtol=0, atol=1e-5)
        torch.testing.assert_close(q(x, src_key_padding_mask=pad).detach(), y_pad, rtol=0, atol=1e-5)
    with torch.no_grad():
        assert not torch.equal(y, mp.dequantize(copy.deepcopy(q))(x))  # activations were quantized
    mp.save(q, tmp_path / "q")
    loaded = mp.load(tmp_path / "q", copy.deepcopy(f))
    assert not any(_fused(m) for m in loaded.layers)
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    plain = mp.dequantize(q)
    assert all(_fused(m) for m in plain.layers) and plain.use_nested_tensor

    alone = copy.deepcopy(f)  # one layer quantized on its own: the encoder (not reached) still packs padded batches
    mp.quantize_(alone.layers[0], mp.QuantConfig(weights="int8", activations="int8:static"), calib=calib)
    set_kernels(alone, False)
    assert alone.use_nested_tensor and not _fused(alone.layers[0]) and _fused(alone.layers[1])
    with torch.no_grad():
        packed = alone(x, src_key_padding_mask=pad)  # the layer takes the nested batch itself (hooks)
        alone.use_nested_tensor = False
        padded = alone(x, src_key_padding_mask=pad)
    torch.testing.assert_close(packed[~pad], padded[~pad], rtol=0, atol=1e-5)
    assert mp.dequantize(alone).layers[0]._forward_pre_hooks == {}  # (the hooks go with the modelpress layers)

    t = copy.deepcopy(f)  # QAT: the fake-quantized forward in eval mode, autograd on or off
    mp.prepare_qat_(t, mp.QuantConfig(weights="int4", activations="int8:static"), calib=calib)
    t.eval()
    with torch.no_grad():
        z = t(x)
        assert not torch.equal(z, f(x))
    with torch.enable_grad():
        torch.testing.assert_close(t(x).detach(), z, rtol=0, atol=1e-5)


def test_transformer_encoder_runs_quantized(tmp_path):
    f = encoder()
    q = copy.deepcopy(f)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every weight matrix is quantized: no warning
        mp.quantize_(q, "int8")
    attn = q.layers[0].self_attn
    assert type(attn) is QuantMultiheadAttention and isinstance(attn.out_proj, QuantLinear)
    assert isinstance(attn.out_proj, nn.modules.linear.NonDynamicallyQuantizableLinear)  # what MHA built
    assert attn.in_proj_weight.shape == (96, 32) and attn.q_proj_weight is None and attn.in_proj_bias.shape == (96,)
    assert "in_proj_weight" not in dict(q.named_parameters(recurse=True))
    with torch.no_grad():
        y = q(X)
        assert cos(y, f(X)) > 0.9999
        set_kernels(q, False)  # the reference path: the dequantized weights' computation
        assert torch.allclose(q(X), mp.dequantize(copy.deepcopy(q))(X), atol=1e-5)
        set_kernels(q, True)
    mp.save(q, tmp_path / "q")
    loaded = mp.load(tmp_path / "q", encoder(seed=3))
    with torch.no_grad():
        assert torch.equal(loaded(X), y)
    assert mp.inspect_saved(tmp_path / "q").total_params == mp.inspect(q).total_params == mp.inspect(f).total_params


@pytest.mark.parametrize("kw", [{"kdim": 16, "vdim": 24}, {"add_bias_kv": True, "bias": False}])
def test_multihead_attention_variants(kw, tmp_path):
    torch.manual_seed(0)
    f = nn.Sequential(nn.MultiheadAttention(32, 4, batch_first=True, **kw)).eval()
    q = mp.quantize_(copy.deepcopy(f), "int4:g32")
    k = torch.randn(2, 5, kw.get("kdim", 32))
    v = torch.randn(2, 5, kw.get("vdim", 32))
    with torch.no_grad():
        y, _ = q[0](X, k, v)
        assert cos(y, f[0](X, k, v)[0]) > 0.99
    if "kdim" in kw:
        assert q[0].in_proj_weight is None and q[0].k_proj_weight.shape == (32, 16)
        assert set(q[0].qnames) == {"q_proj_weight", "k_proj_weight", "v_proj_weight"}
    mp.save(q, tmp_path / "q")
    torch.manual_seed(5)
    loaded = mp.load(tmp_path / "q", nn.Sequential(nn.MultiheadAttention(32, 4, batch_first=True, **kw)).eval())
    with torch.no_grad():
        assert torch.equal(loaded[0](X, k, v)[0], y)
    d = mp.dequantize(loaded)[0]
    assert type(d) is nn.MultiheadAttention and not isinstance(d.out_proj, QuantLinear)
    with torch.no_grad():
        assert torch.allclose(d(X, k, v)[0], y, atol=1e-5)


def test_activation_quantization_is_weight_only_for_attention_and_named():
    q = encoder()
    with pytest.warns(UserWarning, match="self_attn is quantized weight-only.*self_attn.out_proj is quantized weight-only"):
        mp.quantize_(q, mp.QuantConfig(weights="int8", activations="int8"))
    assert q.layers[0].self_attn.out_proj.act is None and str(q.layers[0].linear1.act) == "int8"


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(16, 32, num_layers=2, batch_first=True, bidirectional=True, proj_size=8)
        self.gru = nn.GRU(16, 24)
        self.rnn = nn.RNN(24, 8, nonlinearity="relu", bias=False)

    def forward(self, x):  # [B, T, 16]
        a = self.lstm(x)[0]  # [B, T, 16]
        b = self.gru(x.transpose(0, 1))[0]  # [T, B, 24]
        return a.sum(-1) + self.rnn(b)[0].sum(-1).t()


def recurrent(seed=0):
    torch.manual_seed(seed)
    return Recurrent().eval()


R = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))


@pytest.mark.filterwarnings("ignore:LSTM with projections")
@pytest.mark.parametrize("fmt", ["int8", "int4:g32"])
def test_recurrent_layers(fmt, tmp_path):
    f = recurrent()
    q = mp.quantize_(copy.deepcopy(f), fmt)
    assert (type(q.lstm), type(q.gru), type(q.rnn)) == (QuantLSTM, QuantGRU, QuantRNN)
    assert len(q.lstm.qnames) == 12  # ih, hh, hr per layer and direction; biases stay float
    assert q.lstm.weight_hr_l1_reverse.shape == f.lstm.weight_hr_l1_reverse.shape == (8, 32) and q.lstm.bias_ih_l0.dtype == torch.float32
    assert torch.equal(q.gru.weight_hh_l0, dequantize_tensor(q.gru.qtensor("weight_hh_l0")))
    assert not any(n.startswith("weight") for n, _ in q.named_parameters())
    with torch.no_grad():
        y = q(R)
        assert cos(y, f(R)) > (0.9999 if fmt == "int8" else 0.99)
        d = mp.dequantize(q)
        assert type(d.lstm) is nn.LSTM  # the same computation on the same values (equal up to the BLAS's blocking:
        torch.testing.assert_close(d(R), y, rtol=1e-6, atol=1e-6)  # AVX2 MKL is alignment-dependent)
    mp.save(q, tmp_path / "q")
    loaded = mp.load(tmp_path / "q", recurrent(seed=7))
    with torch.no_grad():
        assert torch.equal(loaded(R), y)
    assert mp.inspect(q).total_bytes == mp.inspect_saved(tmp_path / "q").total_bytes
    assert mp.inspect(q).total_params == mp.inspect_saved(tmp_path / "q").total_params == mp.inspect(f).total_params


def test_a_layer_quantized_alone_serves_threads_with_their_own_padding():
    """The nested-batch hooks keep each call's padding per thread: two threads running one model with different
    padded batches get their own outputs."""
    import threading

    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2).eval()
    mp.quantize_(enc.layers[1], "int8")
    set_kernels(enc, False)
    xs = [torch.randn(3, 9, 32) for _ in range(2)]
    pads = [torch.zeros(3, 9, dtype=torch.bool) for _ in range(2)]
    pads[0][1, 5:] = pads[1][2, 2:] = True
    with torch.no_grad():
        want = [enc(x, src_key_padding_mask=p) for x, p in zip(xs, pads)]
    bad = []

    def run(i):
        with torch.no_grad():
            for _ in range(30):
                y = enc(xs[i], src_key_padding_mask=pads[i])
                if not torch.allclose(y, want[i], atol=1e-5):
                    bad.append(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert bad == []
