"""Fuzzing the recipe parser (hypothesis, bounded and deterministic): any mapping, YAML text or mutation of a
valid recipe gives a recipe that round-trips through its dict form, or a ValueError; never another exception."""
import json
import os

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelpress.recipe import BUILTIN_RECIPES, Recipe, load_recipe

EXAMPLES = int(os.environ.get("MODELPRESS_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="MODELPRESS_FUZZ_EXAMPLES" not in os.environ,
                database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

VALID = {"name": "cnn", "steps": [
    {"fold_bn": {}}, {"equalize": {"iterations": 5}},
    {"quantize": {"weights": "int4:g32", "activations": "int8:static", "exclude": ["head", "re:.*emb.*"],
                  "overrides": {"fc*": "int8", "head": None}, "weight_observer": "mse", "act_observer": "percentile",
                  "percentile": 99.9, "method": "gptq", "method_options": {"damp": 0.01, "act_order": False}}},
    {"quantize": {"weights": "int4", "method": "adaround", "method_options": {"iters": 10, "n_samples": 8}}},
]}
NEAR = ["int8", "int4:g32:g64", "int4:g0", "fp8", "int8:static", "nvfp4:g16", "re:(", "gptq", "awq", "rtn", "hqq",
        "smoothquant", "adaround", "lots", "quantize", "fold_bn", "equalize", "prune", 0, -1, 0.5, 101, 1e308,
        float("nan"), True, None, [], {}, ["a", 1], {"a": [1]}]
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**65, 2**65) | st.floats() | st.text(max_size=10),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)
VALUE = st.sampled_from(NEAR) | JSON


def parsed_or_refused(d):
    try:
        r = Recipe.from_dict(d)
    except ValueError:
        return None
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r  # what parses round-trips
    return r


def mutate(data, tree):
    tree = json.loads(json.dumps(tree))
    node, path = tree, []
    while isinstance(node, (dict, list)) and node and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(list(node) if isinstance(node, dict) else list(range(len(node)))))
        path.append(key)
        node = node[key]
    if not path:
        return data.draw(VALUE)
    parent = tree
    for k in path[:-1]:
        parent = parent[k]
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "delete":
        del parent[path[-1]]
    elif action == "add" and isinstance(node, dict):
        node[data.draw(st.sampled_from(["weights", "method", "damp", "iters", "include", "overrides", "steps",
                                        "iterations", "x"]))] = data.draw(VALUE)
    else:
        parent[path[-1]] = data.draw(VALUE)
    return tree


@FUZZ
@given(data=st.data())
def test_mutated_recipe_parses_or_is_refused(data):
    parsed_or_refused(mutate(data, VALID))


@FUZZ
@given(d=JSON)
def test_arbitrary_data_parses_or_is_refused(d):
    parsed_or_refused(d)


@FUZZ
@given(text=st.text(max_size=80) | st.sampled_from(["steps: [", "steps:\n  - quantize: {weights: int8", "- 1\n- 2",
                                                     "steps: !!python/object:os.system {}", "\x00", "{}"]))
def test_yaml_text_parses_or_is_refused(tmp_path_factory, text):
    f = tmp_path_factory.mktemp("r") / "r.yaml"
    f.write_text(text)
    try:
        load_recipe(str(f))
    except ValueError:
        pass


@pytest.mark.parametrize("name", sorted(BUILTIN_RECIPES))
def test_builtin_recipes_round_trip(name):
    r = load_recipe(name)
    assert Recipe.from_dict(yaml.safe_load(r.to_yaml())) == r
