"""Typed options of recipe steps and algorithm configs: unknown names and wrong types are errors that name
the option and the type it expects (`damp: "lots"` -> "option 'damp' of method 'gptq' must be a number")."""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
_EXP_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _describe(tp) -> str:
    if tp in _NAMES:
        return _NAMES[tp]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        return "a list"
    if origin in (dict, Mapping) or tp is Mapping:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp) -> tuple[bool, Any]:
    """(ok, converted value) for `value` read from YAML/JSON against the annotation `tp`."""
    if tp is Any:
        return True, value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            if a is type(None):
                if value is None:
                    return True, None
                continue
            ok, v = _convert(value, a)
            if ok:
                return True, v
        return False, value
    if origin is typing.Literal:
        return value in typing.get_args(tp), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, str) and _EXP_FLOAT.fullmatch(value.strip()):  # YAML 1.1 (PyYAML) reads 1e-4 as a
            value = float(value)                                            # string; 1.0e-4 as a number
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)  # (ranges: each option's own check)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    if origin in (tuple, list):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            return False, value
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if args:
            out = []
            for v in value:
                ok, v = _convert(v, args[0])
                if not ok:
                    return False, value
                out.append(v)
            value = out
        return True, tuple(value) if origin is tuple else list(value)
    if origin in (dict, Mapping, typing.get_origin(Mapping[str, int])) or tp is Mapping:
        return isinstance(value, Mapping), dict(value) if isinstance(value, Mapping) else value
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value


def build(cls, opts: Mapping[str, Any] | None, what: str, also: "tuple[str, ...]" = ()):
    """`cls(**opts)` for a dataclass `cls`, after checking option names and types. `what` names the owner
    in messages ("step 'prune'", "method 'gptq'"); `also`: options the caller took out of `opts` before
    (listed as known when a name is misspelled)."""
    if opts is None:
        opts = {}
    if not isinstance(opts, Mapping):
        raise ValueError(f"options of {what} must be a mapping of name: value, got {opts!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = set(opts) - set(known)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(map(str, unknown))} for {what}; "
                         f"known: {sorted({*known, *also})}")
    kwargs = {}
    for name, value in opts.items():
        ok, conv = _convert(value, hints.get(name, Any))
        if not ok:
            raise ValueError(f"option {name!r} of {what} must be {_describe(hints[name])}, got {value!r}")
        kwargs[name] = conv
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: {e}") from None


def non_default(obj) -> dict[str, Any]:
    """The dataclass fields of `obj` that differ from their defaults (tuples as lists), for YAML/JSON."""
    out = {}
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        v = getattr(obj, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if v != default:
            out[f.name] = list(v) if isinstance(v, tuple) else (dict(v) if isinstance(v, Mapping) else v)
    return out
