"""Step configs: frozen dataclasses with to_dict / from_dict, validated when built."""
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


@dataclass(frozen=True)
class QuantizeStep:
    """Recipe step `quantize`: QuantConfig options plus the algorithm name."""

    config: QuantConfig
    method: str = "rtn"
    method_options: Mapping[str, Any] | None = None  # the algorithm's Config fields, e.g. {damp: 0.01}

    kind = "quantize"

    def __post_init__(self):
        self.method_config()  # validates the method name and its options

    def method_config(self):
        from dataclasses import fields as dc_fields

        from .algorithms import get_method

        module, _ = get_method(self.method)
        opts = dict(self.method_options or {})
        known = {f.name for f in dc_fields(module.Config)}
        unknown = set(opts) - known
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)} for method {self.method!r}; known: {sorted(known)}")
        return module.Config(**opts)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.config.to_dict().items() if v != getattr(QuantConfig, k, None) or k == "weights"}
        d["method"] = self.method
        if self.method_options:
            d["method_options"] = dict(self.method_options)
        return {"quantize": d}

    @classmethod
    def from_options(cls, opts: Mapping[str, Any]) -> "QuantizeStep":
        opts = dict(opts or {})
        method = opts.pop("method", "rtn")
        method_options = opts.pop("method_options", None)
        return cls(QuantConfig.from_dict(opts), method, method_options)

    def run(self, model, calib=None, progress=None):
        from .quantize import quantize_

        return quantize_(model, self.config, calib=calib, method=self.method_config(), progress=progress)


def _no_unknown(kind: str, opts: Mapping[str, Any], known: set[str]) -> dict[str, Any]:
    if opts is not None and not isinstance(opts, Mapping):
        raise ValueError(f"options of recipe step {kind!r} must be a mapping, got {opts!r}")
    unknown = set(opts or {}) - known
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for step {kind!r}; known: {sorted(known)}")
    return dict(opts or {})


@dataclass(frozen=True)
class FoldBNStep:
    """Recipe step `fold_bn` (no options): fold BatchNorms into the Conv/Linear layers before them."""

    kind = "fold_bn"

    def to_dict(self) -> dict[str, Any]:
        return {"fold_bn": {}}

    @classmethod
    def from_options(cls, opts: Mapping[str, Any] | None) -> "FoldBNStep":
        _no_unknown("fold_bn", opts, set())
        return cls()

    def run(self, model, calib=None, progress=None):
        from .algorithms.fold_bn import fold_bn_

        return fold_bn_(model)


@dataclass(frozen=True)
class EqualizeStep:
    """Recipe step `equalize`: cross-layer equalization of consecutive layer pairs (`iterations` sweeps)."""

    iterations: int = 20

    kind = "equalize"

    def __post_init__(self):
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"equalize iterations must be a positive integer, got {self.iterations!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"equalize": {"iterations": self.iterations}}

    @classmethod
    def from_options(cls, opts: Mapping[str, Any] | None) -> "EqualizeStep":
        return cls(**_no_unknown("equalize", opts, {"iterations"}))

    def run(self, model, calib=None, progress=None):
        from .algorithms.equalize import equalize_

        return equalize_(model, iterations=self.iterations)


STEPS = {"quantize": QuantizeStep, "fold_bn": FoldBNStep, "equalize": EqualizeStep}

BUILTIN_RECIPES: dict[str, list[dict[str, Any]]] = {
    "w8": [{"quantize": {"weights": "int8"}}],
    "w8a8": [{"quantize": {"weights": "int8", "activations": "int8"}}],
    "w8a8-static": [{"quantize": {"weights": "int8", "activations": "int8:static"}}],
    "w4-g32": [{"quantize": {"weights": "int4:g32"}}],
    "w4-g128": [{"quantize": {"weights": "int4:g128"}}],
    "fp8": [{"quantize": {"weights": "fp8_e4m3", "activations": "fp8_e4m3"}}],
    "mxfp4": [{"quantize": {"weights": "mxfp4"}}],
    "nvfp4": [{"quantize": {"weights": "nvfp4"}}],
}


@dataclass(frozen=True)
class Recipe:
    """Steps run in order by `compress`. YAML form:  name: ...  /  steps: [ {quantize: {weights: int8}} ]"""

    name: str
    steps: tuple

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "steps": [s.to_dict() for s in self.steps]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], name: str = "recipe") -> "Recipe":
        if not isinstance(d, Mapping) or "steps" not in d:
            raise ValueError("a recipe is a mapping with a 'steps' list")
        unknown = set(d) - {"name", "steps", "description"}
        if unknown:
            raise ValueError(f"unknown recipe key(s) {sorted(unknown)}; use name, description, steps")
        steps = []
        for i, item in enumerate(d["steps"] or []):
            if not isinstance(item, Mapping) or len(item) != 1:
                raise ValueError(f"recipe step {i + 1} must be a mapping with one key (the step name), got {item!r}")
            (kind, opts), = item.items()
            if kind not in STEPS:
                raise ValueError(f"unknown recipe step {kind!r}; available steps: {', '.join(STEPS)}")
            steps.append(STEPS[kind].from_options(opts))
        if not steps:
            raise ValueError("the recipe has no steps")
        return cls(str(d.get("name", name)), tuple(steps))

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_recipe(recipe: "str | Recipe | Mapping") -> Recipe:
    """A built-in recipe name, a YAML file path, a mapping, or a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return Recipe.from_dict(recipe)
    if recipe in BUILTIN_RECIPES:
        return Recipe.from_dict({"name": recipe, "steps": BUILTIN_RECIPES[recipe]})
    import os

    if not os.path.isfile(recipe):
        raise ValueError(f"unknown recipe {recipe!r}: not a built-in ({', '.join(BUILTIN_RECIPES)}) nor a YAML file")
    import yaml

    with open(recipe) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"recipe file {recipe} is not valid YAML: {e}") from None
    return Recipe.from_dict(data, name=os.path.splitext(os.path.basename(recipe))[0])
