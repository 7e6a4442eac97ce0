"""The sequential calibration runner: block-by-block equals whole-model processing; memory is one block."""
import pytest
import torch
from torch import nn

from modelpress.algorithms.gptq import gptq_quantize, hessian, layer_rows
from modelpress.calibrate import find_blocks, run_sequential
from modelpress.quant import QuantLinear

transformers = pytest.importorskip("transformers")


def tiny_llama(layers: int, hidden: int = 64) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def calib(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (2, 16), generator=g)} for _ in range(n)]


def gptq_in_place(model, blockwise: bool):
    """GPTQ int4:g32 on every Linear, through the runner; returns the runner's statistics."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]

    def process(name, module, xs):
        h = hessian(layer_rows(module, x) for x in xs)
        q = gptq_quantize(module.weight.detach(), h, "int4:g32")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, QuantLinear.from_float(module, "int4:g32", qweight=q))

    return run_sequential(model, calib(), names, process, blockwise=blockwise)


def test_finds_decoder_blocks():
    assert [n for n, _ in find_blocks(tiny_llama(3))] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert find_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU())) == []


def test_blockwise_equals_whole_model():
    a, b = tiny_llama(2), tiny_llama(2)
    stats = gptq_in_place(a, blockwise=True)
    gptq_in_place(b, blockwise=False)
    assert stats["blocks"] == 2
    qa = {n: m.weight_codes for n, m in a.named_modules() if isinstance(m, QuantLinear)}
    qb = {n: m.weight_codes for n, m in b.named_modules() if isinstance(m, QuantLinear)}
    assert qa.keys() == qb.keys() and len(qa) == 2 * 7 + 1  # 7 Linears per block + lm_head
    differing = [n for n in qa if not torch.equal(qa[n], qb[n])]
    assert len(differing) <= 1, differing  # float summation order may flip a code in one layer at most
    x = calib(1, seed=7)[0]
    with torch.inference_mode():
        ya, yb = a(**x).logits, b(**x).logits
    assert torch.allclose(ya, yb, rtol=1e-3, atol=1e-3)


def test_memory_is_one_block_whatever_the_depth():
    few, many = tiny_llama(2), tiny_llama(12)
    s_few, s_many = gptq_in_place(few, True), gptq_in_place(many, True)
    assert s_many["blocks"] == 12
    # captured activations held at once: one block's inputs, independent of the number of blocks
    assert s_many["peak_inputs_bytes"] == s_few["peak_inputs_bytes"]
    hidden_states = 3 * 2 * 16 * 64 * 4  # 3 batches of [2, 16, 64] fp32
    assert hidden_states <= s_many["peak_inputs_bytes"] <= 4 * hidden_states  # + rotary cos/sin, masks


def test_later_layers_see_quantized_inputs():
    """The runner feeds each layer inputs computed by the already-quantized layers before it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    seen = {}

    def process(name, module, xs):
        seen[name] = xs[0].clone()
        q = QuantLinear.from_float(module, "int2:g8")
        model[int(name)] = q

    x = torch.randn(4, 8)
    run_sequential(model, [x], ["0", "1"], process)
    assert torch.equal(seen["0"], x)
    with torch.inference_mode():
        assert torch.allclose(seen["1"], model[0](x))  # the quantized first layer's output


def test_empty_calibration_is_an_error():
    with pytest.raises(ValueError, match="calib"):
        run_sequential(nn.Linear(2, 2), [], [""], lambda *a: None)
