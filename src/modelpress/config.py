"""QuantConfig: what `quantize_` quantizes and to which formats (a frozen dataclass, validated when built).
Recipe steps and recipes live in modelpress.recipe."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from .formats import parse_format
from .quant.activation import parse_activation
from .select import check_patterns

WEIGHT_OBSERVERS = ("auto", "minmax", "mse")
ACT_OBSERVERS = ("minmax", "ema", "percentile", "mse")


def _tuple(v):
    if v is None:
        return None
    return (v,) if isinstance(v, str) else tuple(v)


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and to which formats.

    weights: a format spec (`int8`, `int4:g32`, `mxfp4`, ...) or None to leave weights float.
    activations: None, `int8` (dynamic per token), `int8:static` (calibrated per tensor), `fp8_e4m3[:static]`.
    include / exclude: layer-name patterns (see modelpress.select). overrides: pattern -> weight spec for
    mixed precision (None keeps the layer float); the first matching pattern wins.
    weight_observer: `auto` (MSE clipping search for integers of 4 bits or fewer, min/max otherwise),
    `minmax` or `mse`. act_observer: how static activation ranges are taken from calibration data.
    """

    weights: str | None = "int8"
    activations: str | None = None
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    overrides: Mapping[str, str | None] | None = None
    weight_observer: str = "auto"
    act_observer: str = "minmax"
    percentile: float = 99.99

    def __post_init__(self):
        object.__setattr__(self, "include", _tuple(self.include))
        object.__setattr__(self, "exclude", _tuple(self.exclude))
        if self.weights is not None:
            parse_format(self.weights)
        parse_activation(self.activations)
        for spec in (self.overrides or {}).values():
            if spec is not None:
                parse_format(spec)
        check_patterns(self.include)
        check_patterns(self.exclude)
        check_patterns((self.overrides or {}).keys())
        if self.weights is None and self.activations is None and not self.overrides:
            raise ValueError("QuantConfig quantizes nothing: give weights and/or activations")
        if self.weight_observer not in WEIGHT_OBSERVERS:
            raise ValueError(f"weight_observer must be one of {WEIGHT_OBSERVERS}, got {self.weight_observer!r}")
        if self.act_observer not in ACT_OBSERVERS:
            raise ValueError(f"act_observer must be one of {ACT_OBSERVERS}, got {self.act_observer!r}")
        if not 50 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["include"] = list(self.include) if self.include is not None else None
        d["exclude"] = list(self.exclude) if self.exclude is not None else None
        d["overrides"] = dict(self.overrides) if self.overrides else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown QuantConfig option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)
