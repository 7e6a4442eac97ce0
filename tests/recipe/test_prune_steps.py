"""Pruning recipe steps: YAML prune -> recover -> quantize through compress, with the report's records;
channel pruning with recovery; option checking."""
import pytest
import torch
import yaml

import modelpress as mp
from modelpress.formats.sparse import satisfies, unpack_mask
from modelpress.recipe import Recipe, load_recipe
from modelpress.recipe.steps import get_step

from helpers import mlp, outlier_inputs
from prune_models import DepthwiseNet, images, randomize_bn

RECIPE = """
name: sparse-w4
steps:
  - prune: {pattern: "2:4", method: sparsegpt, method_options: {block_size: 64}}
  - recover: {steps: 20, lr: 0.001, data: calib}
  - quantize: {weights: "int4:g32", method: gptq}
"""


def test_prune_recover_quantize_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    recipe = load_recipe(str(path))
    assert Recipe.from_dict(yaml.safe_load(recipe.to_yaml())) == recipe
    model = mlp()
    x = outlier_inputs(t=256, k=64)
    report = mp.compress(model, recipe, calib=list(x.split(32)), latency_repeats=3)
    kinds = [r["step"] for r in report.steps]
    assert kinds == ["prune", "recover"]
    prune = report.steps[0]
    assert prune["sparsity"] == pytest.approx(0.5) and prune["bytes_after"] < 0.6 * prune["bytes_before"]
    assert report.steps[1]["loss"] == "match_reference" and report.steps[1]["steps"] == 20
    keep = unpack_mask(model[0].weight_mask, (128, 64))
    assert satisfies(keep, 2, 4) and str(model[0].weight_format) == "int4:g32"
    assert (model[0].dequantized_weight()[~keep] == 0).all()
    assert report.size["sparsity"] == pytest.approx(0.5) and report.size["ratio"] > 6
    assert "sparsity" in str(report)


def test_channel_pruning_recipe_reports_parameters():
    torch.manual_seed(0)
    model = randomize_bn(DepthwiseNet())
    data = images()
    train = [(x, torch.randint(0, 10, (x.shape[0],))) for x in data]
    steps = [{"prune_channels": {"ratio": 0.5, "importance": "ezcrop"}}, {"recover": {"steps": 5, "lr": 0.01}}]
    report = mp.compress(model, {"name": "pc", "steps": steps}, calib=data, train=train, latency_repeats=3)
    pc, rec = report.steps
    assert pc["params_after"] < 0.4 * pc["params_before"] and rec["loss"] == "task" and rec["data"] == "train"
    assert report.size["compressed_params"] == pc["params_after"] < report.size["reference_params"]
    assert "parameters" in str(report)


def test_step_options_are_checked():
    with pytest.raises(ValueError, match="unknown option"):
        get_step("prune").from_options({"sparsity": 0.5, "ratio": 2})
    with pytest.raises(ValueError, match="must be a number"):
        get_step("prune_channels").from_options({"ratio": "half"})
    with pytest.raises(ValueError, match="positive integer"):
        get_step("recover").from_options({"steps": 0})
    with pytest.raises(ValueError, match="removes nothing"):
        get_step("prune_transformer").from_options({})
    for name in ("sparse-2:4", "sparse-50", "sparse-2:4-w4", "prune-channels-50", "prune-ffn50-heads25"):
        assert load_recipe(name).name == name
