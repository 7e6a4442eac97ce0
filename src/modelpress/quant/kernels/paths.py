"""Every way a quantized layer can compute its output, and when each one is correct.

A path has: `applies(layer, cpu, rows)` (it computes this format on this CPU: exactly, to float rounding, or for
the bf16 paths to bf16 rounding), `prepare(layer, cpu)` (a kernel state built from the layer's buffers, cached on
the layer) and `run(state, layer, x)` (the output, or None
when the input holds NaN/Inf that integer codes cannot carry). "reference" (dequantize then compute) always
applies and needs no state; "dense" (speed mode only) keeps a float copy of the weight, and "dense-bf16" (speed mode,
CPUs that multiply bf16 in hardware) a bf16 copy, used with a bf16 input (bf16 inside, as torch's own kernels).
"native-decode" computes exactly what the reference path computes, with the weight decoded natively into a
temporary (decode.py) and the input fake-quantized natively (actq.py). 2-D convolutions also have channels-last
variants (layout.py), measured like the others: "dense-cl" (speed mode: the float copy kept in NHWC order) and
"decode-cl" (the weight decoded at each call, as native-decode; float rounding instead of bit-identical); on CPUs that
multiply bf16 in hardware, weight-only layers also "decode-bf16" (decoded at each call, torch's bf16 convolution:
bf16 inside, as "dense-bf16" without the kept copy).
Depthwise layers also have "native-dw" (depthwise.py): the native depthwise kernel on the decoded weight (decoded
at each call in memory mode, kept decoded in speed mode: a few KB) and the fake-quantized input. fp8 weights with
fp8 activations have "native-fp8" (fp8.py): the fp8 values multiplied as bf16 numbers (CPUs with AVX512-BF16) or
as fp32 (elsewhere), exact products, from a bf16 copy of the weight (memory mode: copies up to 2 MB); where it
declines (NaN / Inf in the input) the whole call runs the reference path (one activation scale for the whole tensor).
On CPUs with bf16 hardware fp8 Linears also have "fp8-tiles" (fp8.Fp8Tiles: the weight's fp8 values decoded per call,
torch's bf16 product, no copy kept).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import actq, build, decode, depthwise, fp8, int1, layout, native, probe, torch_ops
from .cpu import cpu_info

LINEAR = ("native-fp8", "fp8-tiles", "native", "native-planes", "native-bf16", "native-f32", "native-int1", "int8pack",
          "int4pack", "linear_dynamic", "int_mm", "int1_mm", "native-decode")
CONV = ("native-dw", "native-fp8", "native", "native-decode", "decode-cl", "decode-bf16")
# without timing (MODELPRESS_TUNE=0), the first path that applies; measured on the machines in benchmarks/README.md
STATIC_ORDER = {"linear": ("native-fp8", "native", "int_mm", "linear_dynamic", "int8pack", "int4pack", "native-int1", "int1_mm",
                           "native-decode"),
                "conv": ("native-dw", "native-fp8", "native", "native-decode")}
BF16_ROWS = 64  # without timing: weight-only layers take the bf16 tiles from this many rows on, on bf16 hardware


def static_choice(kind: str, names: list[str], layer, cpu, rows: int) -> str | None:
    """The path the fixed rules pick among `names` (those that apply), or None."""
    if "native-bf16" in names and cpu.bf16_fast and rows >= BF16_ROWS:
        return "native-bf16"
    order = STATIC_ORDER[kind]
    if cpu.isa == "scalar":  # the portable build (ARM, old x86): torch's own kernels first, they are vectorized
        native_paths = ("native-dw", "native-fp8", "native", "native-int1")
        order = tuple(n for n in order if n not in native_paths) + native_paths
    return next((n for n in order if n in names), None)


def _native_ok(layer, cpu, conv: bool) -> bool:
    if cpu.isa == "none" or not native.supports(layer, cpu.isa, conv):
        return False
    if conv and not native.conv_supported(layer):
        return False
    lib = build.load()
    return lib is not None and cpu.isa in lib.available()


# torch's / oneDNN's bf16 products: a NaN or Inf in one row can spread to other rows' sums (a K not a multiple of the
# tile: measured with K = 33), so inputs holding any go through the caller's row-by-row split (kernels._run)
BF16_PRODUCTS = ("native-bf16", "dense-bf16", "decode-bf16")


def _finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x.sum()))  # (one pass; an overflowing sum only declines, which is safe)


def applies(kind: str, name: str, layer, cpu, rows: int) -> bool:
    if name == "reference":
        return True
    if name == "dense":
        return True
    if name in ("dense-cl", "decode-cl"):
        return kind == "conv" and layout.applies(layer) and (name == "dense-cl" or decode.supports(layer))
    if name == "decode-bf16":  # measured only (not in STATIC_ORDER); weight-only, as the bf16 tiles of Linear layers
        return kind == "conv" and layer.act is None and cpu.bf16_fast and decode.supports(layer)
    if name == "dense-bf16":  # not after int8 activations: a bf16 product would exceed W8A8's 1e-3 (fp8 values are
        return cpu.bf16_fast and (layer.act is None or layer.act.name.startswith("fp8"))  # bf16 numbers already)
    if name == "native":
        return _native_ok(layer, cpu, kind == "conv")
    if name == "native-fp8":
        return (kind == "conv") == hasattr(layer, "kernel_size") and fp8.applies(layer, cpu, _speed(layer))
    if name == "fp8-tiles":  # measured only (not in STATIC_ORDER)
        return kind == "linear" and fp8.tiles_apply(layer, cpu)
    if name == "native-decode":  # (the codes are checked when the decoder is built: prepare)
        return decode.supports(layer)
    if name == "native-dw":
        return (kind == "conv" and cpu.isa != "none" and decode.supports(layer) and depthwise.applies(layer)
                and cpu.isa in build.load().available())
    if name == "native-planes":  # measured, never a fixed-rule choice (STATIC_ORDER): faster only at some shapes
        return kind == "linear" and _native_ok(layer, cpu, False) and native.planes_ok(layer, cpu.isa)
    if name in ("native-bf16", "native-f32"):  # native-f32: measured only (not in STATIC_ORDER)
        return kind == "linear" and layer.act is None and _native_ok(layer, cpu, False) and native.bf16_supported(layer)
    if kind == "conv":
        return False
    if name == "native-int1":
        return int1.applies(layer.weight_format, layer.act) and int1.native_ok(layer, cpu)
    if not torch_ops.applies(name, layer, cpu, rows):
        return False
    if name == "int1_mm":  # the same oneDNN product as int_mm
        return probe.exact("int_mm", cpu)
    return name not in ("int_mm", "linear_dynamic") or probe.exact(name, cpu)


def prepare(kind: str, name: str, layer, cpu):
    if name in ("native", "native-bf16", "native-f32", "native-planes"):
        return native.NativeLayer(layer, cpu.isa, conv=kind == "conv", planes=name == "native-planes",
                                  narrow_copy=name == "native")
    if name == "native-int1":
        return int1.NativeInt1(layer, cpu.isa)
    if name == "native-fp8":
        return fp8.Fp8State(layer, cpu)
    if name == "fp8-tiles":
        return fp8.Fp8Tiles(layer)
    if name in ("native-decode", "decode-cl", "decode-bf16"):
        return decode.decoder(layer)
    if name == "native-dw":  # speed mode: the decoded weight kept (C x kh x kw values); memory mode: decoded per call
        if _speed(layer):
            return layer.dequantized_weight(torch.float32).contiguous(), cpu.isa
        return decode.decoder(layer), cpu.isa
    if name in ("dense", "dense-bf16", "dense-cl"):
        dt = torch.bfloat16 if name == "dense-bf16" else torch.float32
        w = layer.dequantized_weight(torch.float32).to(dt).contiguous()  # (group padding: a strided view)
        w = layout.weight(w) if name == "dense-cl" else w
        return w, None if layer.bias is None else layer.bias.detach().float()
    return torch_ops.prepare(name, layer)


def run(kind: str, name: str, state, layer, x: torch.Tensor) -> torch.Tensor | None:
    if name in ("native", "native-planes", "native-int1"):
        y = state.linear(x) if kind == "linear" else state.conv(x, layer)
        return y if y is None or y.dtype == x.dtype else y.to(x.dtype)
    if name in ("native-fp8", "fp8-tiles"):  # declined (NaN / Inf: one scale for the whole tensor): the reference
        y = state.run(layer, x)
        return y if y is not None else layer.reference(x)
    if name in BF16_PRODUCTS and not _finite(x):  # declined: the rows with NaN / Inf go to the reference path
        return None
    if name in ("native-bf16", "native-f32"):
        return state.linear_tiles(x, torch.bfloat16 if name == "native-bf16" else torch.float32).to(x.dtype)
    if name == "native-decode":  # the reference path's computation, decoded natively
        if state is None:  # damaged codes: the reference path raises naming them
            return layer.reference(x)
        xq = actq.quantize_input(layer, x, conv=kind == "conv")
        w = state.weight()
        w = w if w.dtype == xq.dtype else w.to(xq.dtype)
        b = layer._parameters.get("bias")  # (not `layer.bias`: Module.__getattr__ costs ~0.4 us a read, per call)
        b = b if b is None or b.dtype == xq.dtype else b.to(xq.dtype)
        return F.linear(xq, w, b) if kind == "linear" else layer._conv_forward(xq, w, b)
    if name == "decode-bf16":  # the weight decoded natively, then torch's bf16 convolution (bf16 inside, no copy kept)
        if state is None:  # damaged codes: the reference path raises naming them
            return layer.reference(x)
        b = layer._parameters.get("bias")
        y = layer._float._conv_forward(layer, x.to(torch.bfloat16), state.weight().to(torch.bfloat16),
                                        None if b is None else b.to(torch.bfloat16))
        return y if y.dtype == x.dtype else y.to(x.dtype)
    if name == "native-dw":
        dec, isa = state
        if dec is None:  # damaged codes: the reference path raises naming them
            return layer.reference(x)
        w = dec if isinstance(dec, torch.Tensor) else dec.weight()
        xq = actq.quantize_input(layer, x, conv=True)
        b = layer._parameters.get("bias")
        y = depthwise.conv(xq, w, b, isa)
        if y is None:  # not a contiguous fp32 NCHW input: torch's convolution of the same values
            y = layer._float._conv_forward(layer, xq, w.to(xq.dtype), None if b is None else b.to(xq.dtype))
        return y if y.dtype == x.dtype else y.to(x.dtype)
    if name in ("dense-cl", "decode-cl"):
        if state is None:  # decode-cl, damaged codes: the reference path raises naming them
            return layer.reference(x)
        w, b = state if name == "dense-cl" else (layout.weight(state.weight()),
                                                 layer._parameters.get("bias"))
        xq = x if layer.act is None else actq.quantize_input(layer, x, conv=True)
        w = w if w.dtype == xq.dtype else w.to(xq.dtype)
        b = b if b is None or b.dtype == xq.dtype else b.to(xq.dtype)
        return layout.conv2d(layer, xq, w, b)
    if name in ("dense", "dense-bf16"):
        w, b = state
        xq = x if layer.act is None else actq.quantize_input(layer, x, conv=kind == "conv")
        if xq.dtype != w.dtype:  # (conversions skipped when they would be no-ops: this is the per-call path)
            xq, w = (xq.to(w.dtype), w) if name == "dense-bf16" else (xq, w.to(xq.dtype))
        if b is not None and b.dtype != xq.dtype:
            b = b.to(xq.dtype)
        y = F.linear(xq, w, b) if kind == "linear" else layer._float._conv_forward(layer, xq, w, b)
        return y if y.dtype == x.dtype else y.to(x.dtype)
    return torch_ops.run(state, name, layer, x)


def display(kind: str, name: str, layer, cpu) -> str:
    """What a person reads in `inspect`: the kernel and, for native ones, the instruction set and product."""
    if name in ("native-bf16", "native-f32"):
        return f"native {'bf16' if name == 'native-bf16' else 'fp32'} tiles"
    if name == "native-decode":
        return "native decode"
    if name == "fp8-tiles":
        return "native fp8 bf16 tiles"
    if name == "native-fp8":
        return f"native {cpu.isa} fp8 ({'bf16' if fp8.bf16(cpu) else 'fp32'} products)"
    if name == "native-dw":
        return f"native {cpu.isa} depthwise"
    if name in ("decode-cl", "dense-cl"):
        return "native decode, channels-last" if name == "decode-cl" else "dense, channels-last"
    if name == "decode-bf16":
        return "native decode, bf16 product"
    if name == "native-int1":
        vnni = cpu.isa in ("avx512_vnni", "avx2_vnni", "scalar")
        return f"native {cpu.isa} int1 {'u8s8' if vnni else 's16s8'}"
    if name not in ("native", "native-planes"):
        return name
    return f"native {cpu.isa} {native.product(layer, cpu.isa, name == 'native-planes')}"


def extra_bytes(name: str, layer) -> int:
    """Memory a path keeps beside the stored buffers, per weight: the dense copy 4 bytes; torch's int8 layouts
    (int_mm, linear_dynamic) a second int8 copy, int4pack a second 4-bit one; native kernels read the codes as
    stored (plus a few bytes of scales per row, not counted), except convolutions (int8 and int16 copies of 8-bit
    filters, an int16 copy of 4-bit ones: small, see native.py; or, for those with narrow products, only an int8 or
    int16 copy interleaved, native.narrow_conv) and small Linears (an int8 or int16 copy interleaved for the narrow
    products, native.narrow)."""
    n = 1
    for s in layer.weight_shape:
        n *= s
    dense = n * layer.weight_format.bits // 8 if "weight_mask" in layer._buffers else 0  # sparse: dense codes
    if name == "native" and (hasattr(layer, "kernel_size") or native.as_conv(layer, cpu_info().isa)):
        # convolutions (and 4-bit Linears run as 1 x 1 convolutions): copies of the filters (native.py)
        # int8 + int16, or int16 (and a 4-bit Linear's narrow copy)
        isa = cpu_info().isa
        width = native.narrow_conv(layer, isa)
        if width:  # convolutions with narrow products keep only their interleaved copy
            return width * n + dense
        return (3 * n if layer.weight_format.bits == 8 else 2 * n) + native.narrow(layer, isa) * n + dense
    if name == "native":  # (plus the narrow products' interleaved copy: 0, 1 or 2 bytes per weight)
        return native.narrow(layer, cpu_info().isa) * n + dense
    if name in ("native-bf16", "native-f32", "native-planes"):
        return dense
    if name == "native-dw":
        return 4 * n + dense if _speed(layer) else dense
    if name == "native-fp8":
        return fp8.extra_bytes(layer)
    return {"dense": 4 * n, "dense-cl": 4 * n, "dense-bf16": 2 * n, "int_mm": n, "linear_dynamic": n, "int4pack": n // 2, "int1_mm": n,
            "native-int1": n}.get(name, 0)


def _speed(layer) -> bool:
    return getattr(layer, "kernel_mode", "memory") == "speed"
