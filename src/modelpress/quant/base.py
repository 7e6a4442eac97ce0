"""What every quantized layer shares: packed-weight buffers (one QTensor per quantized parameter), activation
settings, the kernel switch, and what makes it a drop-in replacement for the float module it took the place of.

A quantized layer stores each quantized float parameter `P` (`weight`; `in_proj_weight`; `weight_ih_l0`, ...) as
buffers `P_codes`, `P_scale` (+ `P_zero`, `P_global_scale`). Reading `layer.P` gives the dequantized values in
the layer's float dtype, computed on access (no float copy is kept). The layer also takes over the float module's
plain attributes (`in_features`, `padding_idx`, a subclass's `embed_scale` ...) and remembers its class and float
dtype, so code that inspects its layers keeps working and `dequantize` can rebuild the float module.

Dtype changes (`.half()`, `.to(torch.bfloat16)`, `.double()`) change the float dtype and the float parameters
(bias): codes and scales keep their storage dtypes, which are part of the format. Device moves move everything
and keep buffers shared between tied layers shared.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..formats import Format, QTensor, dequantize_tensor, grid, packed_nbytes, parse_format
from ..formats.qtensor import _scale_dtype
from .activation import ActFormat, fake_quant, parse_activation

_QT_KEYS = ("codes", "scale", "zero", "global_scale", "mask")  # mask: a pruned weight's kept values (sparse)
_MODULE_INTERNALS = frozenset(vars(nn.Module()))  # _parameters, _buffers, _modules, hooks, training ...
_NEVER_ADOPT = frozenset({"_flat_weights", "_flat_weight_refs"})  # RNN views of the float parameters


def _empty_qtensor(fmt: Format, shape: tuple[int, ...]) -> QTensor:
    """Zero buffers with the exact shapes and dtypes a QTensor of this format and shape has (for loading)."""
    rows, groups, g = grid(fmt, shape)
    zero = torch.zeros(rows, groups, dtype=torch.uint8) if fmt.kind == "int" and not fmt.symmetric else None
    gs = torch.ones((), dtype=torch.float32) if fmt.kind == "nvfp4" else None
    return QTensor(fmt, shape, torch.zeros(packed_nbytes(rows * groups * g, fmt.bits), dtype=torch.uint8),
                   torch.zeros(rows, groups, dtype=_scale_dtype(fmt)), zero, gs)


class QuantMixin:
    """Mixed into the quantized layers, before their float base class (`QuantLinear(QuantMixin, nn.Linear)`)."""

    def _init_quant(self, qweights: "QTensor | dict[str, QTensor]", act: "ActFormat | str | None",
                    smooth: torch.Tensor | None = None, float_dtype: torch.dtype = torch.float32) -> None:
        if isinstance(qweights, QTensor):
            qweights = {"weight": qweights}
        if len({str(q.fmt) for q in qweights.values()}) != 1:
            raise ValueError("all quantized parameters of one layer share one format")
        first = next(iter(qweights.values()))
        self.weight_format: Format = first.fmt
        self.weight_shape = tuple(first.shape)
        self.qnames = tuple(qweights)
        self.qshapes = {n: tuple(q.shape) for n, q in qweights.items()}
        self.float_dtype = float_dtype
        self.act: ActFormat | None = parse_activation(act)
        self.use_kernels = True  # False forces the dequantize-then-compute reference path
        from .kernels import default_mode

        self.kernel_mode = default_mode()  # "memory" (packed weights only) or "speed" (a dense copy where faster)
        self._kernel_cache: dict = {}  # kernel layouts derived from the buffers (rebuilt when they change)
        self._kernel_plan: dict = {}  # (rows bucket, dtype, input shape) -> kernels.Choice
        self.model_weight_bytes: int | None = None  # fp32 weight bytes its model reads per pass (kernels.note_model)
        for name, q in qweights.items():
            for key, t in q.tensors().items():  # the same tensors, not copies: tied layers share them
                self.register_buffer(f"{name}_{key}", t if t.is_contiguous() else t.contiguous())
        if smooth is not None:  # inputs are divided by this per-channel vector (the weight holds W * smooth)
            self.register_buffer("input_smooth", smooth.detach().float().reshape(-1).clone())
        if self.act is not None and self.act.static:
            self.register_buffer("input_scale", torch.ones((), dtype=torch.float32))
            self.register_buffer("input_zero", torch.zeros((), dtype=torch.float32))

    def _adopt(self, m: nn.Module | None, default_attrs: tuple[str, ...] = ()) -> None:
        """Take over the float module's class and its plain attributes (those not set already)."""
        if m is None:
            self.float_cls = getattr(type(self), "_float", None)
            self._float_attrs = tuple(a for a in default_attrs if a in self.__dict__)
            return
        names = []
        for k, v in vars(m).items():
            if k in _MODULE_INTERNALS or k in _NEVER_ADOPT or isinstance(v, (torch.Tensor, nn.Module)):
                continue
            names.append(k)
            self.__dict__.setdefault(k, v)
        quantized, absent = set(self.qnames), []
        for k, p in m._parameters.items():  # float parameters the layer keeps (biases ...): copies, frozen
            if k in quantized or k in self._parameters:
                continue
            if p is None and hasattr(type(self), k):
                absent.append(k)  # answered by the class (MultiheadAttention's q_proj_weight when unused: None)
            else:
                self.register_parameter(k, None if p is None else nn.Parameter(p.detach().clone(), requires_grad=False))
        self._absent_params = tuple(absent)
        for k, b in m._buffers.items():
            if k not in self._buffers:
                self.register_buffer(k, None if b is None else b.clone(), persistent=k not in m._non_persistent_buffers_set)
        for k, c in m._modules.items():  # children stay the same objects (quantized on their own if selected)
            if k not in self._modules:
                self._modules[k] = c
        self.float_cls = type(m)
        self._float_attrs = tuple(names)

    @staticmethod
    def float_weights(m: nn.Module) -> dict[str, torch.Tensor]:
        """The float parameters of `m` that this type stores quantized, by name."""
        return {"weight": m.weight}

    @staticmethod
    def qshape_of(m: nn.Module) -> tuple[int, ...]:
        """Shape of the (first) quantized parameter of float module `m`, as the manifest records it."""
        return tuple(m.weight.shape)

    # ---- the packed weights ----------------------------------------------------------------------------------

    def qtensor(self, name: str = "weight") -> QTensor:
        b = self._buffers
        return QTensor(self.weight_format, self.qshapes[name], b[f"{name}_codes"], b[f"{name}_scale"],
                       b.get(f"{name}_zero"), b.get(f"{name}_global_scale"), b.get(f"{name}_mask"))

    @property
    def qweight(self) -> QTensor:
        return self.qtensor(self.qnames[0])

    def make_sparse_(self, nnz: int) -> None:
        """Buffers of a sparse weight keeping `nnz` values (formats/sparse.py), to be filled by load_state_dict."""
        from ..formats.sparse import codes_nbytes, mask_nbytes

        name = self.qnames[0]
        shape = self.qshapes[name]
        self.register_buffer(f"{name}_mask", torch.zeros(mask_nbytes(shape), dtype=torch.uint8))
        self.register_buffer(f"{name}_codes", torch.zeros(codes_nbytes(self.weight_format, nnz), dtype=torch.uint8))
        self._kernel_cache.clear()
        self._kernel_plan = {}

    def dequantized_weight(self, dtype: torch.dtype = torch.float32, name: str | None = None) -> torch.Tensor:
        return dequantize_tensor(self.qtensor(name or self.qnames[0]), dtype)

    def float_param(self, name: str) -> torch.Tensor:
        """The float parameter `name` as the float module held it (its layout, the layer's float dtype)."""
        return self.dequantized_weight(self.float_dtype, name)

    def _read_param(self, name: str) -> torch.Tensor:
        """What reading `layer.<name>` gives: the values decoded once per call inside `materialized`, else now."""
        mat = self.__dict__.get("_materialized")
        return mat[name] if mat is not None and name in mat else self.float_param(name)

    def quant_buffer_names(self) -> list[str]:
        names = [f"{n}_{k}" for n in self.qnames for k in _QT_KEYS if f"{n}_{k}" in self._buffers]
        return names + [n for n in ("input_smooth", "input_scale", "input_zero") if n in self._buffers]

    def float_numel(self) -> int:
        """Parameters of the float layer: the quantized ones plus the float ones it kept (bias ...)."""
        import math

        own = sum(p.numel() for p in self._parameters.values() if p is not None)
        return sum(math.prod(s) for s in self.qshapes.values()) + own

    # ---- activations -----------------------------------------------------------------------------------------

    def set_input_range(self, scale: torch.Tensor, zero: torch.Tensor) -> None:
        self.input_scale.copy_(scale.reshape(()))
        self.input_zero.copy_(zero.reshape(()))

    def quantize_input(self, x: torch.Tensor, per_token: bool = True) -> torch.Tensor:
        """Reference fake-quantization of the layer input (identity without an activation format)."""
        if self.act is None or x.numel() == 0:  # (an empty batch: nothing to quantize, no range to take)
            return x
        if self.act.static:
            return fake_quant(x, self.act, self.input_scale, self.input_zero)
        return fake_quant(x, self.act, per_token=per_token)

    # ---- module protocol -------------------------------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        """Dtype conversions reach the float parameters and the compute dtype, never the codes and scales (their
        dtypes are the format's); device moves update shared buffers in place, so tied layers stay tied."""
        keep = {id(self._buffers[n]) for n in self.quant_buffer_names()}

        def apply(t):
            if id(t) not in keep:
                return fn(t)
            probe = fn(torch.empty(0, dtype=t.dtype, device=t.device))
            new = fn(t) if probe.dtype == t.dtype else t.to(probe.device)
            if new is not t and new.dtype == t.dtype:
                try:
                    t.data = new  # the same tensor object: every layer that shares it sees the move
                    return t
                except RuntimeError:
                    return new
            return new

        dev = next(iter(self._buffers.values())).device
        self.float_dtype = fn(torch.empty(0, dtype=self.float_dtype, device=dev)).dtype
        self._kernel_cache = {}
        return super()._apply(apply, recurse)

    def __getstate__(self):
        """Copies (deepcopy) start without kernel layouts: fbgemm's packed weights cannot be copied, and they
        derive from the buffers anyway."""
        state = {**super().__getstate__(), "_kernel_cache": {}}
        state.pop("_kernel_sig", None)
        state.pop("_kernel_refs", None)
        return state

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel_cache = {}  # kernel layouts derive from the buffers: rebuild after a load
        self.__dict__.pop("_kernel_refs", None)  # (and hold no reference to buffers a load replaces)
        self.__dict__.pop("_kernel_sig", None)
        return super()._load_from_state_dict(*args, **kwargs)

    def __setattr__(self, name, value):
        if name in self.__dict__.get("qnames", ()):
            raise AttributeError(f"{type(self).__name__}.{name} is computed from the packed codes and cannot be "
                                 "assigned; use modelpress.dequantize(model) to get float layers back")
        super().__setattr__(name, value)

    def quant_extra_repr(self) -> str:
        a = f", activations={self.act}" if self.act is not None else ""
        return f"weights={self.weight_format}{a}"

    # ---- back to float -----------------------------------------------------------------------------------------

    def to_float(self) -> nn.Module:
        """The float module this layer replaced (same class and attributes), holding the dequantized values."""
        cls = self.float_cls
        f = cls.__new__(cls)
        nn.Module.__init__(f)
        for k in self._float_attrs:
            if k in self.__dict__:
                f.__dict__[k] = self.__dict__[k]
        for name in self.qnames:
            f.register_parameter(name, nn.Parameter(self.float_param(name).detach().clone()))
        for name in getattr(self, "_absent_params", ()):
            f.register_parameter(name, None)
        for name, p in self._parameters.items():
            f.register_parameter(name, None if p is None else nn.Parameter(p.detach().clone()))
        quant = set(self.quant_buffer_names())
        for name, b in self._buffers.items():
            if name not in quant:
                f.register_buffer(name, b, persistent=name not in self._non_persistent_buffers_set)
        for name, c in self._modules.items():
            f._modules[name] = c
        return f.train(self.training)

    @classmethod
    def _fmt(cls, fmt: "Format | str") -> Format:
        return parse_format(fmt)


@contextlib.contextmanager
def materialized(*layers):
    """Decode the layers' quantized parameters once for the duration of a call whose float code reads them several
    times (nn.MultiheadAttention, RNNs). Traced graphs decode at each read instead (no state changes under tracing)."""
    layers = [m for m in layers if isinstance(m, QuantMixin)]
    if torch.compiler.is_compiling() or not layers:
        yield
        return
    for m in layers:
        m.__dict__["_materialized"] = {n: m.float_param(n) for n in m.qnames}
    try:
        yield
    finally:
        for m in layers:
            m.__dict__.pop("_materialized", None)


def share_state(model: nn.Module, aliases: dict[str, str]) -> None:
    """Make each state-dict entry `alias` the very tensor of entry `kept` (both buffers or both parameters, same
    shape and dtype): what `save` stored once because it was one tensor becomes one tensor again."""
    def slot(key: str):
        owner, _, leaf = key.rpartition(".")
        try:
            m = model.get_submodule(owner)
        except AttributeError:
            return None
        for kind in ("_buffers", "_parameters"):
            if getattr(m, kind).get(leaf) is not None:
                return m, kind, leaf
        return None

    for alias, kept in aliases.items():
        a, k = slot(alias), slot(kept)
        if a is None or k is None or a[1] != k[1]:
            continue
        ta, tk = getattr(a[0], a[1])[a[2]], getattr(k[0], k[1])[k[2]]
        if ta is not tk and ta.shape == tk.shape and ta.dtype == tk.dtype:
            getattr(a[0], a[1])[a[2]] = tk
            if isinstance(a[0], QuantMixin):
                a[0]._kernel_cache = {}


def check_float_weight(name: str, w: torch.Tensor, verb: str = "quantize") -> None:
    if not torch.isfinite(w).all():
        raise ValueError(f"layer {name!r} has NaN or infinite weights; refusing to {verb} it")


def new_empty(fmt: "Format | str", shape) -> QTensor:
    return _empty_qtensor(parse_format(fmt), tuple(shape))


def float_dtype_of(t: torch.Tensor | None) -> torch.dtype:
    return t.dtype if t is not None and torch.is_floating_point(t) else torch.float32


__all__ = ["QuantMixin", "new_empty", "check_float_weight", "float_dtype_of", "materialized", "share_state", "nn"]
