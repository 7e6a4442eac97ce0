"""One way to pick layers: include / exclude patterns on module names, and name -> value maps.

A pattern is an fnmatch glob on the dotted module name (`encoder.layer.*.attention.*`), or a regular
expression after `re:` (`re:.*(q|k|v)_proj`) that must match the whole name.
"""
from __future__ import annotations

import fnmatch
import re
from typing import Any, Iterable, Mapping

from torch import nn


def matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def matches_any(name: str, patterns: Iterable[str] | None) -> bool:
    return any(matches(name, p) for p in patterns or ())


def selected(name: str, include: Iterable[str] | None, exclude: Iterable[str] | None) -> bool:
    """True when `name` matches an include pattern (or there are none) and no exclude pattern."""
    return (include is None or matches_any(name, include)) and not matches_any(name, exclude)


def select_modules(model: nn.Module, include=None, exclude=None, types: tuple[type, ...] | None = None):
    """[(name, module)] of the named modules picked by the patterns (and of the given types, if any)."""
    return [(n, m) for n, m in model.named_modules()
            if n and selected(n, include, exclude) and (types is None or isinstance(m, types))]


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted `name` (as named_modules() gives it) with `new`, and at every other name
    under which the same module object is registered, so a shared module stays shared."""
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = owner._modules.get(child)
    places = [(m, key) for m in model.modules() for key, c in m._modules.items() if c is old and old is not None]
    setattr(owner, child, new)
    for m, key in places:
        setattr(m, key, new)
    from .hf import mark_quantized, unmark_quantized
    from .nn.encoder_layer import sync  # (torch's fused encoder path would skip the layers just swapped in)
    from .quant.base import QuantMixin

    ours = False
    for m in model.modules():
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerEncoder)):
            sync(m)
        ours = ours or isinstance(m, QuantMixin) or type(m).__module__.startswith("modelpress.nn.")
    # a transformers model holding modelpress layers (after quantize_, convert_, prune_, factorize_ ...) refuses
    # save_pretrained with what to do (it would write a checkpoint from_pretrained fills with random weights); the
    # mark goes when none is left (a failed step rolled back, dequantize)
    (mark_quantized if ours else unmark_quantized)(model)


def lookup(name: str, mapping: Mapping[str, Any] | None, default: Any = None) -> Any:
    """The value of the first pattern in `mapping` that matches `name` (mixed-precision plans)."""
    for pattern, value in (mapping or {}).items():
        if matches(name, pattern):
            return value
    return default


def check_patterns(patterns: Iterable[str] | None) -> None:
    """Raise ValueError for a regular expression that does not compile (named in the message)."""
    for p in patterns or ():
        if not isinstance(p, str):
            raise TypeError(f"layer patterns must be strings, got {p!r}")
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise ValueError(f"bad regular expression in layer pattern {p!r}: {e}") from None
