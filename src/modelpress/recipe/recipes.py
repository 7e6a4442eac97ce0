"""Recipes: steps run in order by `compress`; built-in names, YAML files, or mappings."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

from .steps import get_step

BUILTIN_RECIPES: dict[str, list[dict[str, Any]]] = {
    "w8": [{"quantize": {"weights": "int8"}}],
    "w8a8": [{"quantize": {"weights": "int8", "activations": "int8"}}],
    "w8a8-static": [{"quantize": {"weights": "int8", "activations": "int8:static"}}],
    "w4-g32": [{"quantize": {"weights": "int4:g32"}}],
    "w4-g128": [{"quantize": {"weights": "int4:g128"}}],
    "fp8": [{"quantize": {"weights": "fp8_e4m3", "activations": "fp8_e4m3"}}],
    "mxfp4": [{"quantize": {"weights": "mxfp4"}}],
    "nvfp4": [{"quantize": {"weights": "nvfp4"}}],
    # pruning (prune.py, transforms/prune): SparseGPT sparsity, then optionally GPTQ on the kept weights
    "sparse-50": [{"prune": {"sparsity": 0.5, "method": "sparsegpt", "exclude": ["lm_head"]}}],
    "sparse-2:4": [{"prune": {"pattern": "2:4", "method": "sparsegpt", "exclude": ["lm_head"]}}],
    "sparse-2:4-w4": [{"prune": {"pattern": "2:4", "method": "sparsegpt", "exclude": ["lm_head"]}},
                      {"quantize": {"weights": "int4:g32", "method": "gptq", "exclude": ["lm_head"]}}],
    "prune-channels-50": [{"prune_channels": {"ratio": 0.5, "importance": "ezcrop"}},
                          {"recover": {"steps": 300, "lr": 0.003}}],
    "prune-ffn50-heads25": [{"prune_transformer": {"ffn": 0.5, "heads": 0.25}}, {"recover": {"steps": 200}}],
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
            other = sorted(map(str, set(d) - {"name", "description"})) if isinstance(d, Mapping) else []
            raise ValueError("a recipe is a mapping with a 'steps' list" + (f"; unknown key(s) {other}" if other else ""))
        unknown = set(d) - {"name", "steps", "description"}
        if unknown:
            raise ValueError(f"unknown recipe key(s) {sorted(map(str, unknown))}; use name, description, steps")
        items = d["steps"]
        if items is not None and not isinstance(items, list):
            raise ValueError(f"the recipe's 'steps' must be a list of steps, got {type(items).__name__}")
        steps = []
        for i, item in enumerate(items or []):
            if not isinstance(item, Mapping) or len(item) != 1:
                raise ValueError(f"recipe step {i + 1} must be a mapping with one key (the step name), got {item!r}")
            (kind, opts), = item.items()
            steps.append(get_step(str(kind)).from_options(opts))
        if not steps:
            raise ValueError("the recipe has no steps")
        return cls(str(d.get("name", name)), tuple(steps))

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_recipe(recipe: "str | Recipe | Mapping") -> Recipe:
    """A built-in recipe name, a YAML file path, a mapping, a Recipe, or one step (e.g. `mp.Target(ratio=8)`)."""
    from .steps import Step

    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Step):
        return _one_step(recipe)
    if isinstance(recipe, Mapping):
        return Recipe.from_dict(recipe)
    if not isinstance(recipe, (str, os.PathLike)):
        raise TypeError(f"a recipe is a built-in name, a YAML path, a mapping or a Recipe, got {type(recipe).__name__}")
    if recipe in BUILTIN_RECIPES:
        return Recipe.from_dict({"name": recipe, "steps": BUILTIN_RECIPES[recipe]})
    if not os.path.isfile(recipe):
        if str(recipe).endswith((".yaml", ".yml")) or os.sep in str(recipe):
            raise ValueError(f"recipe file {str(recipe)!r} does not exist")
        raise ValueError(f"unknown recipe {str(recipe)!r}: not a built-in ({', '.join(BUILTIN_RECIPES)}) "
                         "nor a YAML file")
    import yaml

    try:
        with open(recipe) as f:
            data = yaml.load(f, Loader=_unique_keys_loader())  # a SafeLoader (no tags that build objects)
    except yaml.YAMLError as e:
        raise ValueError(f"recipe file {recipe} is not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise ValueError(f"recipe file {recipe} is nested too deeply") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read recipe file {recipe}: {e}") from None
    return Recipe.from_dict(data, name=os.path.splitext(os.path.basename(recipe))[0])


def _unique_keys_loader():
    """yaml.SafeLoader refusing a mapping that gives a key twice ({weights: int8, weights: int4} would silently run
    the second)."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:  # the mapping's own keys (a merge `<<: *anchor` may be overridden)
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    hash(key)
                except TypeError:
                    raise yaml.constructor.ConstructorError(None, None, "found an unhashable key",
                                                            key_node.start_mark) from None
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"found the key {key!r} twice",
                                                            key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return UniqueKeys


def _one_step(step) -> Recipe:
    return Recipe(step.kind, (step,))
