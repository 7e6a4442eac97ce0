"""ONNX export, round-tripped through its real consumer (ONNX Runtime on CPU): each quantized layer kind becomes
the intended ONNX node, the ONNX model agrees with the PyTorch model, and a failed export writes nothing."""
import json
import math
import warnings

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.io.export.onnx import _restore, _swap_in_shims
from modelpress.quant import QuantMixin

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def mlp(n=5, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(64, 128)] + [nn.Linear(128, 128) for _ in range(n - 2)] + [nn.Linear(128, 10)]
    return nn.Sequential(*[m for layer in layers for m in (layer, nn.ReLU())][:-1]).eval()


def quantize(model, weights, activations=None, overrides=None, calib=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mp.quantize_(model, mp.QuantConfig(weights=weights, activations=activations, overrides=overrides),
                            calib=calib)


def ops(path):
    return sorted({n.op_type for n in onnx.load(str(path / "model.onnx")).graph.node})


def parity(path):
    return json.loads((path / "parity.json").read_text())


X = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
MIXED = {"0": "int4:g32", "2": "int8", "4": "int4:g32:asym", "6": "int3:g16", "8": "int4:tensor"}


def test_shims_compute_what_the_layers_compute():
    """The ONNX layouts (MatMulNBits blocks, transposed QDQ codes, integer matmul) checked without ONNX Runtime."""
    for weights, act, over in [("int4:g32", None, MIXED), ("int8", "int8", None), ("int8", "int8:static", None)]:
        m = mp.set_kernels(quantize(mlp(), weights, act, over, calib=[X]), False)
        ref = m(X)
        originals = _swap_in_shims(m, "nbits")
        shimmed = m(X)
        _restore(m, originals)
        assert torch.allclose(shimmed, ref, atol=1e-5, rtol=1e-5) and torch.equal(m(X), ref)


def test_weight_only_linear_as_matmulnbits_and_qdq(tmp_path, capsys):
    m = quantize(mlp(), "int4:g32", overrides={**MIXED, "8": "int4:g24"})  # 24: no power-of-two block of 16+
    mp.export(m, tmp_path / "o", format="onnx", example_inputs=X)
    assert "ONNX Runtime vs PyTorch: cosine" in capsys.readouterr().out
    assert {"MatMulNBits", "DequantizeLinear"} <= set(ops(tmp_path / "o"))
    p = parity(tmp_path / "o")
    assert p["cosine"] >= 0.9999 and p["top1_agreement"] == 1.0 and p["latency_ms"]["onnxruntime"] > 0
    mp.export(m, tmp_path / "q", format="onnx", example_inputs=X, linear="qdq", quiet=True)
    assert "MatMulNBits" not in ops(tmp_path / "q") and parity(tmp_path / "q")["cosine"] >= 0.9999


@pytest.mark.parametrize("act,node", [("int8", "MatMulInteger"), ("int8:static", "QuantizeLinear")])
def test_w8a8_linear(tmp_path, act, node):
    m = quantize(mlp(), "int8", act, calib=[X])
    mp.export(m, tmp_path / "o", format="onnx", example_inputs=X, quiet=True)
    assert node in ops(tmp_path / "o")
    p = parity(tmp_path / "o")
    assert p["cosine"] >= 0.99999 and p["max_abs_error"] < 1e-4


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.dw, self.pw = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8 * 16, 10)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.relu(self.pw(self.dw(h))) + h  # a residual
        return self.fc(nn.functional.max_pool2d(h, 2).flatten(1))


@pytest.mark.parametrize("act", ["int8", "int8:static"])
def test_w8a8_cnn_is_qdq_and_agrees_on_top1(tmp_path, act):
    torch.manual_seed(0)
    x = torch.randn(64, 1, 8, 8)
    m = quantize(CNN().eval(), "int8", act, calib=[x[:32]])
    mp.export(m, tmp_path / "o", format="onnx", example_inputs=x, quiet=True)
    assert {"Conv", "DequantizeLinear", "QuantizeLinear"} <= set(ops(tmp_path / "o"))
    p = parity(tmp_path / "o")
    assert p["top1_agreement"] >= 0.995 and p["cosine"] >= 0.9999


def test_bert_keyword_inputs_embeddings_and_dynamic_shapes(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    m = quantize(transformers.BertModel(cfg).eval(), "int4:g32")  # embeddings quantized too
    ids = torch.randint(0, 200, (2, 12))
    mp.export(m, tmp_path / "o", format="onnx", example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
              quiet=True)
    assert parity(tmp_path / "o")["cosine"] >= 0.9999
    s = ort.InferenceSession(str(tmp_path / "o" / "model.onnx"), providers=["CPUExecutionProvider"])
    ids2 = torch.randint(0, 200, (3, 7))  # another batch and sequence length
    mask = torch.ones_like(ids2)
    mask[0, 5:] = 0
    got = s.run(None, {"input_ids": ids2.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        ref = m(input_ids=ids2, attention_mask=mask).last_hidden_state
    assert torch.nn.functional.cosine_similarity(torch.from_numpy(got).flatten(), ref.flatten(), 0) > 0.9999


def test_int4_weights_with_int8_activations_run_in_onnxruntime(tmp_path):
    """Per-row activation QDQ feeding a MatMul of dequantized 4-bit weights: ONNX Runtime fused that pattern into
    MatMulIntegerToFloat, which takes one activation zero point and failed at run time on a Llama."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    quantize(m, "int4:g32", "int8")
    ids = torch.randint(0, 100, (2, 12))
    mp.export(m, tmp_path / "o", format="onnx", example_inputs={"input_ids": ids}, quiet=True)
    assert parity(tmp_path / "o")["cosine"] >= 0.9999
    ids2 = torch.randint(0, 100, (3, 7))
    with torch.no_grad():
        ref = m(input_ids=ids2).logits
    got = run_ort(tmp_path / "o", {"input_ids": ids2})
    assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), 0) > 0.9999


def dense_float_copies(path, model):
    """Float initializers shaped as a quantized layer's weight (a dequantized copy in the graph): [N, ...], its
    transpose or [N, K]."""
    shapes = {t for m in model.modules() if isinstance(m, QuantMixin)
              for s in [tuple(m.weight.shape)] for t in (s, s[::-1], (s[0], math.prod(s[1:])))}
    return [i.name for i in onnx.load(str(path / "model.onnx")).graph.initializer
            if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and tuple(i.dims) in shapes]


def run_ort(path, feeds):
    s = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    return torch.from_numpy(s.run(None, {k: v.numpy() for k, v in feeds.items()})[0])


def test_vit_reads_its_quantized_patch_weight(tmp_path):
    """ViT's patch embedding reads projection.weight.dtype: the shims expose the weight's dtype and shape without
    holding a float copy, and the export stays quantized."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=1, num_attention_heads=4, num_labels=5)
    torch.manual_seed(0)
    m = quantize(transformers.ViTForImageClassification(cfg).eval(), "int8")
    proj = m.vit.embeddings.patch_embeddings.projection
    originals = _swap_in_shims(m, "nbits")
    shim = m.vit.embeddings.patch_embeddings.projection
    assert (shim.weight.dtype, shim.weight.shape) == (proj.weight.dtype, proj.weight.shape)
    assert not any(n.endswith("weight") for n, _ in [*shim.named_parameters(), *shim.named_buffers()])
    _restore(m, originals)
    x = torch.randn(3, 3, 32, 32)
    mp.export(m, tmp_path / "o", format="onnx", example_inputs={"pixel_values": x}, quiet=True)
    assert {"Conv", "DequantizeLinear", "MatMulNBits"} <= set(ops(tmp_path / "o"))
    assert dense_float_copies(tmp_path / "o", m) == [] and type(m.vit.embeddings.patch_embeddings.projection) is type(proj)
    p = parity(tmp_path / "o")
    assert p["cosine"] >= 0.9999 and p["top1_agreement"] == 1.0
    with torch.no_grad():
        ref = m(pixel_values=x).logits
    got = run_ort(tmp_path / "o", {"pixel_values": x})
    assert (got - ref).abs().max() < 1e-3


def test_t5_reads_its_quantized_wo_weight(tmp_path):
    """T5's feed-forward checks isinstance(wo.weight, Tensor) and its dtype; the encoder-decoder exports quantized."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(vocab_size=128, d_model=64, d_ff=128, num_layers=1, num_heads=4, d_kv=16,
                                decoder_start_token_id=0)
    torch.manual_seed(0)
    m = quantize(transformers.T5ForConditionalGeneration(cfg).eval(), "int8")
    feeds = {"input_ids": torch.randint(0, 128, (2, 8)), "decoder_input_ids": torch.randint(0, 128, (2, 3))}
    mp.export(m, tmp_path / "o", format="onnx", example_inputs=feeds, quiet=True)
    assert "MatMulNBits" in ops(tmp_path / "o") and dense_float_copies(tmp_path / "o", m) == []
    assert parity(tmp_path / "o")["cosine"] >= 0.9999
    with torch.no_grad():
        ref = m(**feeds).logits
    got = run_ort(tmp_path / "o", feeds)
    assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), 0) > 0.9999
    assert (got - ref).abs().max() < 1e-2 * ref.abs().max()


def test_encoder_layer_with_a_float_attention_exports(tmp_path):
    """nn.TransformerEncoderLayer with its attention left float: its quantized feed-forward layers run their own
    forward (not torch's fused path), and the attention's quantized out_proj, whose weight the attention reads
    itself, gives a dequantized weight (DequantizeLinear), not a placeholder."""
    torch.manual_seed(0)
    x = torch.randn(4, 10, 32)
    f = nn.Sequential(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), nn.Flatten(),
                      nn.Linear(320, 3)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.quantize_(f, mp.QuantConfig(weights="int8", exclude=["0.self_attn"]))
    assert type(f[0].self_attn) is nn.MultiheadAttention and isinstance(f[0].self_attn.out_proj, QuantMixin)
    mp.export(f, tmp_path / "o", format="onnx", example_inputs=x, quiet=True)
    assert {"DequantizeLinear", "MatMulNBits"} <= set(ops(tmp_path / "o"))
    assert dense_float_copies(tmp_path / "o", f) == []
    assert parity(tmp_path / "o")["cosine"] >= 0.9999
    with torch.no_grad():
        ref = f(x)
    got = run_ort(tmp_path / "o", {"input_0": x})
    assert (got - ref).abs().max() < 1e-2 * ref.abs().max()


def test_parity_below_threshold_and_unsupported_layers_write_nothing(tmp_path):
    m = quantize(mlp(), "int4:g32")
    with pytest.raises(ValueError, match=r"parity below the threshold.*cosine [01]\.\d{6}"):
        mp.export(m, tmp_path / "o", format="onnx", example_inputs=X, min_cosine=1.01, quiet=True)
    assert list(tmp_path.iterdir()) == []
    mx = quantize(mlp(), "int8", overrides={"4": "mxfp4"})
    with pytest.raises(ValueError, match=r"layer '4'.*mxfp4.*ONNX"):
        mp.export(mx, tmp_path / "o", format="onnx", example_inputs=X)
    assert list(tmp_path.iterdir()) == [] and all(type(mx[i]) is mp.QuantLinear for i in (0, 4, 8))
    with pytest.raises(ValueError, match="example_inputs"):
        mp.export(m, tmp_path / "o", format="onnx")

    class Positions(nn.Embedding):  # a subclass with its own forward, as OPT's learned positions
        def forward(self, ids):
            return super().forward(ids + 2)

    pos = quantize(nn.Sequential(Positions(16, 8), nn.Linear(8, 2)), "int8")
    with pytest.raises(ValueError, match=r"layer '0' \(QuantEmbedding\[Positions\].*Positions computes more than a "
                                         r"plain Embedding.*exclude='0'"):
        mp.export(pos, tmp_path / "o", format="onnx", example_inputs=torch.randint(0, 12, (2, 3)))
    with pytest.raises(TypeError, match="example_inputs"):
        mp.export(m, tmp_path / "o", format="onnx", example_inputs=[1, 2])


def test_example_inputs_that_do_not_fit_the_model_write_nothing(tmp_path):
    """A wrong shape is reported as such (not torch.export's "5 not in VR[3, 3]"), before anything is written."""
    m = quantize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten()).eval(), "int8")
    with pytest.raises(ValueError, match="example_inputs: .*does not run through the model"):
        mp.export(m, tmp_path / "o", format="onnx", example_inputs=torch.randn(2, 5, 8, 8))
    assert list(tmp_path.iterdir()) == [] and type(m[0]) is mp.QuantConv2d
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")  # an existing export is left alone, even with overwrite=True
    with pytest.raises(ValueError, match="example_inputs: .*does not run through the model"):
        mp.export(quantize(mlp(), "int4:g32"), tmp_path / "o", format="onnx", example_inputs=torch.randn(4, 65),
                  overwrite=True)
    assert [f.name for f in (tmp_path / "o").iterdir()] == ["keep.txt"]


def test_a_batch_of_one_exports_a_model_that_runs_at_other_batches(tmp_path):
    """torch.export fixes a dimension of size 1: traced on the example repeated, and checked at a second batch"""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=64)
    torch.manual_seed(0)
    m = quantize(transformers.LlamaForCausalLM(cfg).eval(), "int4:g32")
    mp.export(m, tmp_path / "o", format="onnx", example_inputs={"input_ids": torch.randint(0, 64, (1, 7))}, quiet=True)
    report = parity(tmp_path / "o")
    assert report["inputs"]["input_ids"] == [1, 7] and report["other_batch"]["batch"] == 2
    assert report["other_batch"]["cosine"] > 0.9999
    s = ort.InferenceSession(str(tmp_path / "o" / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 64, (3, 9))
    with torch.no_grad():
        ref = m(ids).logits
    got = torch.from_numpy(s.run(None, {"input_ids": ids.numpy()})[0])
    assert got.shape == ref.shape and torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), 0) > 0.9999
    with pytest.raises(ValueError, match="dimension of size 1.*at least 2"):  # one token: the length too
        mp.export(m, tmp_path / "one", format="onnx", example_inputs={"input_ids": torch.randint(0, 64, (1, 1))},
                  quiet=True)
    assert not (tmp_path / "one").exists()
    mp.export(m, tmp_path / "static", format="onnx", example_inputs={"input_ids": torch.randint(0, 64, (1, 1))},
              quiet=True, dynamic=False)
    assert "other_batch" not in parity(tmp_path / "static")


def test_fp16_models_nan_inputs_and_nan_outputs_are_refused_by_name(tmp_path):
    m = quantize(mlp(3), "int4:g32")
    with pytest.raises(ValueError, match="input 0 holds NaN"):
        mp.export(m, tmp_path / "a", format="onnx", example_inputs=torch.full((2, 64), float("nan")), quiet=True)
    with pytest.raises(ValueError, match="in fp32.*dtype torch.float16.*model.float()"):
        mp.export(m.half(), tmp_path / "b", format="onnx", example_inputs=X.half(), quiet=True)
    m = quantize(mlp(3), "int8")
    with torch.no_grad():
        m[2].bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="PyTorch's outputs hold NaN"):
        mp.export(m, tmp_path / "c", format="onnx", example_inputs=X, quiet=True)
    assert not any((tmp_path / d).exists() for d in "abc")


@pytest.mark.parametrize("spec", ["int8:tensor", "int4:tensor", "int6:g64", "int3:g32", "int2:g16:asym", "ternary:g32",
                                  "int1:g32", "int4:g48", "int4:g32+int8", "int3:g32+int8"])
def test_every_integer_width_is_matmulnbits_exact_in_a_default_session(tmp_path, spec):
    """DequantizeLinear + MatMul is fused by ONNX Runtime's default optimizations into a MatMulNBits that quantizes
    the activations to int8 (~1e-2 relative error in a weight-only model): every integer width is written as
    MatMulNBits itself (4-bit codes for int1..int4 and ternary, 8-bit for int5..int8), which computes in fp32"""
    weights, _, act = spec.partition("+")  # (+int8: dynamic int8 activations, fake-quantized before the node)
    m = quantize(mlp(3), weights, act or None)
    mp.export(m, tmp_path / "o", format="onnx", example_inputs=X, quiet=True)
    assert "MatMulNBits" in ops(tmp_path / "o") and "DequantizeLinear" not in ops(tmp_path / "o")
    s = ort.InferenceSession(str(tmp_path / "o" / "model.onnx"), providers=["CPUExecutionProvider"])  # defaults
    got = torch.from_numpy(s.run(None, {s.get_inputs()[0].name: X.numpy()})[0])
    with torch.no_grad():
        ref = mp.set_kernels(m, False)(X)  # the reference path (the kernels' 14-bit inputs differ by ~1e-4)
    assert (got - ref).norm() / ref.norm() < 1e-5


def test_refusals_keep_their_words_and_infinite_outputs_are_compared_as_values(tmp_path):
    conv = mp.quantize_(nn.Sequential(nn.Conv2d(1, 4, 3)), "fp8_e4m3")  # (an input with a dimension of size 1)
    with pytest.raises(ValueError, match="integer-valued formats") as e:
        mp.export(conv, tmp_path / "c", format="onnx", example_inputs=torch.randn(1, 1, 8, 8), quiet=True)
    assert "dimension of size 1" not in str(e.value)

    class Masked(nn.Module):  # logits masked with -inf, as causal or padding masks do
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            y = self.fc(x)
            return y.masked_fill(torch.arange(10) >= 8, float("-inf"))

    m = quantize(Masked().eval(), "int8")
    mp.export(m, tmp_path / "m", format="onnx", example_inputs=X, quiet=True)
    assert parity(tmp_path / "m")["cosine"] > 0.9999
