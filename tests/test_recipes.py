import pytest
import yaml

from modelpress.recipe import BUILTIN_RECIPES, QuantizeStep, Recipe, load_recipe


@pytest.mark.parametrize("name", list(BUILTIN_RECIPES))
def test_builtin_recipes_yaml_round_trip(name):
    r = load_recipe(name)
    assert r.name == name and len(r.steps) == len(BUILTIN_RECIPES[name])
    assert all(s.kind == next(iter(d)) for s, d in zip(r.steps, BUILTIN_RECIPES[name]))
    if name[0] in "wfmn":  # the quantization recipes are one quantize step
        assert len(r.steps) == 1 and isinstance(r.steps[0], QuantizeStep)
    assert Recipe.from_dict(yaml.safe_load(r.to_yaml())) == r


def test_required_builtins_exist():
    for name in ("w8", "w8a8", "w4-g32", "w4-g128", "mxfp4", "nvfp4"):
        assert name in BUILTIN_RECIPES


def test_yaml_file_round_trip(tmp_path):
    text = """
name: mixed
steps:
  - quantize:
      weights: int4:g32
      activations: null
      exclude: [head, "re:.*embed.*"]
      overrides: {"layer0.*": int8, "layer1": null}
      weight_observer: mse
      method: rtn
"""
    f = tmp_path / "r.yaml"
    f.write_text(text)
    r = load_recipe(str(f))
    cfg = r.steps[0].config
    assert cfg.weights == "int4:g32" and cfg.exclude == ("head", "re:.*embed.*")
    assert dict(cfg.overrides) == {"layer0.*": "int8", "layer1": None}
    assert cfg.weight_observer == "mse"
    again = tmp_path / "again.yaml"
    again.write_text(r.to_yaml())
    assert load_recipe(str(again)) == r


@pytest.mark.parametrize("steps,match", [
    ([{"sharpen": {"amount": 0.5}}], "unknown recipe step 'sharpen'"),
    ([{"quantize": {"weights": "int9"}}], "unknown number format 'int9'"),
    ([{"quantize": {"weights": "int8", "colour": "red"}}], r"unknown option\(s\) \['colour'\] for recipe step 'quantize'"),
    ([{"quantize": {"weights": "int8", "method": "gptq", "method_options": {"damp": "lots"}}}],
     r"option 'damp' of method 'gptq' must be a number, got 'lots'"),
    ([{"quantize": {"weights": "int8", "overrides": ["a", "b"]}}], r"option 'overrides' .* must be a mapping"),
    ([{"quantize": {"weights": 8}}], r"option 'weights' .* must be a string or null, got 8"),
    ([{"quantize": {"weights": "int8", "exclude": [1]}}], r"option 'exclude' .* must be"),
    ([{"equalize": {"iterations": "many"}}], r"option 'iterations' of recipe step 'equalize' must be an integer"),
    ([{"equalize": {"iterations": True}}], r"must be an integer, got True"),
    ([{"fold_bn": {"x": 1}}], r"unknown option\(s\) \['x'\] for recipe step 'fold_bn'"),
    ([{"fold_bn": [1]}], r"options of recipe step 'fold_bn' must be a mapping"),
    ([{"quantize": {"weights": "int8", "method": "magic"}}], "unknown quantization method 'magic'"),
    ([{"quantize": {"weights": "int8", "activations": "int16"}}], "unsupported activation format"),
    ([], "no steps"),
    (["quantize"], "one key"),
    ({"quantize": {}}, "must be a list"),
])
def test_recipe_errors_name_the_problem(steps, match):
    with pytest.raises(ValueError, match=match):
        Recipe.from_dict({"name": "bad", "steps": steps})


def test_misspelled_quantize_option_lists_every_option_the_step_takes():
    import dataclasses

    from modelpress import QuantConfig

    known = sorted({f.name for f in dataclasses.fields(QuantConfig) if f.init} | {"method", "method_options"})
    with pytest.raises(ValueError, match="methd") as e:
        Recipe.from_dict({"steps": [{"quantize": {"weights": "int4:g32", "methd": "gptq"}}]})
    assert str(e.value).endswith(f"known: {known}")
    step = Recipe.from_dict({"steps": [{"quantize": {"weights": "int4:g32", "method": "gptq",
                                                     "method_options": {"damp": 0.02}}}]}).steps[0]
    assert (step.method, step.method_options) == ("gptq", {"damp": 0.02})


def test_unknown_recipe_name_and_bad_yaml(tmp_path):
    with pytest.raises(ValueError, match="unknown recipe 'w5'"):
        load_recipe("w5")
    f = tmp_path / "bad.yaml"
    f.write_text("steps: [ {quantize: {weights: int8}\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_recipe(str(f))
    f.write_text("name: x\nsteps: []\nextra: 1\n")
    with pytest.raises(ValueError, match="unknown recipe key"):
        load_recipe(str(f))
    f.write_text("steps:\n  - quantize:\n      weights: int8\n      weights: int4\n")  # the second would have won
    with pytest.raises(ValueError, match="found the key 'weights' twice"):
        load_recipe(str(f))
    f.write_text("stepz:\n  - quantize: {weights: int8}\n")
    with pytest.raises(ValueError, match=r"'steps' list; unknown key\(s\) \['stepz'\]"):
        load_recipe(str(f))
    f.write_text("steps:\n  - quantize: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_recipe(str(f))
    with pytest.raises(ValueError, match="recipe file 'missing/r.yaml' does not exist"):
        load_recipe("missing/r.yaml")


def test_yaml_merge_keys_still_work(tmp_path):
    """A merge key (`<<: *anchor`) is not a duplicate; its keys may be overridden by the mapping's own."""
    f = tmp_path / "m.yaml"
    f.write_text("base: &q {weights: int8, method: rtn}\nsteps:\n  - quantize: {<<: *q}\n"
                 "  - quantize: {<<: *q, weights: int4}\n")
    with pytest.raises(ValueError, match="unknown recipe key"):  # (the anchor's holder is not a recipe key)
        load_recipe(str(f))
    f.write_text("steps:\n  - quantize: &q {weights: int8, include: ['a*']}\n  - quantize: {<<: *q, weights: int4}\n")
    r = load_recipe(str(f))
    assert [s.config.weights for s in r.steps] == ["int8", "int4"]
    f.write_text("steps:\n  - quantize: {[1]: 2}\n")
    with pytest.raises(ValueError, match="not valid YAML.*unhashable key"):
        load_recipe(str(f))


def test_numbers_in_exponent_form_and_non_finite_ones(tmp_path):
    """PyYAML reads `1e-4` as a string (YAML 1.1 wants a dot): a number option takes it; NaN / inf are refused."""
    f = tmp_path / "r.yaml"
    f.write_text("steps:\n  - quantize: {weights: int4, method: gptq, method_options: {damp: 1e-2}}\n"
                 "  - train: {steps: 2, lr: 3e-4}\n")
    quant, train = load_recipe(str(f)).steps
    assert quant.method_config().damp == 0.01 and train.lr == 3e-4
    f.write_text("steps:\n  - train: {steps: 2, distill: {output: .nan}}\n")
    with pytest.raises(ValueError, match="distillation weight 'output' must be >= 0 and finite, got nan"):
        load_recipe(str(f))
