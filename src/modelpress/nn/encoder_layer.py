"""nn.TransformerEncoderLayer / nn.TransformerEncoder holding modelpress layers.

torch's fused inference path of nn.TransformerEncoderLayer (eval mode, no autograd) reads `linear1.weight`,
`linear2.weight`, ... and never calls those layers' forward, so a modelpress layer there (activation quantization,
QAT's fake quantization, a kernel) would be skipped. A layer holding one gets the flag torch itself checks first
(`activation_relu_or_gelu` = 0): it runs its own forward, the same computation. An encoder of such layers stops
packing padded batches into nested tensors (only the fused path takes them); and since a layer can be quantized on
its own, inside an encoder that still packs them, such a layer also takes a nested input itself (hooks: padded in,
with the padding as its key padding mask; nested out, as the encoder expects). Everything is undone from the
activation and the user's setting when the layer holds no modelpress layer any more (dequantize).
"""
from __future__ import annotations

import threading

import torch
from torch import nn

NESTED_ATTR = "_modelpress_nested"  # an encoder whose nested packing modelpress turned off


def _ours(m: nn.Module) -> bool:
    return any(type(c).__module__.startswith("modelpress.") for c in m.modules())


def sync(m: nn.Module) -> None:
    """Set or undo the above on `m` (an encoder layer or an encoder) for what it holds now."""
    if isinstance(m, nn.TransformerEncoderLayer):
        ours = _ours(m)
        act = m.activation
        relu = act is nn.functional.relu or isinstance(act, nn.ReLU)
        gelu = act is nn.functional.gelu or isinstance(act, nn.GELU)
        m.activation_relu_or_gelu = 0 if ours else 1 if relu else 2 if gelu else 0  # (torch's own rule)
        hooked = _unpack in m._forward_pre_hooks.values()  # (found by the function: handles would not survive a
        if ours and not hooked:                              # deepcopy, which copies the hooks)
            m.register_forward_pre_hook(_unpack, with_kwargs=True)
            m.register_forward_hook(_repack, always_call=True)  # (also after an exception: the stack stays paired)
        elif not ours and hooked:
            for hooks, fn in ((m._forward_pre_hooks, _unpack), (m._forward_hooks, _repack)):
                for k in [k for k, f in hooks.items() if f is fn]:
                    del hooks[k]
                    for extra in ("_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
                                  "_forward_hooks_always_called"):
                        getattr(m, extra, {}).pop(k, None)
    elif isinstance(m, nn.TransformerEncoder):
        if _ours(m):
            if getattr(m, "use_nested_tensor", False):
                m.use_nested_tensor = False
                m.__dict__[NESTED_ATTR] = True
        elif m.__dict__.pop(NESTED_ATTR, False):
            m.use_nested_tensor = True


_calls = threading.local()  # per thread, per layer: a stack of the padding masks of the calls under way (None:
# the input was not nested), so threads sharing a model (serving) and re-entrant calls keep their own


def _stack(layer) -> list:
    stacks = _calls.__dict__.setdefault("stacks", {})
    return stacks.setdefault(id(layer), [])


def _unpack(layer, args, kwargs):
    """A nested batch (from an encoder that packs padded batches) -> padded, its padding as the key padding mask."""
    src = args[0] if args else kwargs.get("src")
    if not isinstance(src, torch.Tensor) or not src.is_nested:
        _stack(layer).append(None)
        return None
    lengths = [t.shape[0] for t in src.unbind()]  # (batch first: the only layout the encoder packs)
    padded = src.to_padded_tensor(0.0)
    steps = torch.arange(padded.shape[1], device=padded.device)
    pad = steps[None, :] >= torch.tensor(lengths, device=padded.device)[:, None]
    _stack(layer).append(pad)
    kwargs = {**kwargs, "src_key_padding_mask": pad}
    if args:
        return (padded, *args[1:]), kwargs
    return args, {**kwargs, "src": padded}


def _repack(layer, args, out):
    stack = _stack(layer)
    pad = stack.pop() if stack else None
    if not stack:
        _calls.__dict__.get("stacks", {}).pop(id(layer), None)
    if pad is None or not isinstance(out, torch.Tensor):
        return None
    return torch._nested_tensor_from_mask(out, ~pad, mask_check=False)
