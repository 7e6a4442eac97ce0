"""The replacement transforms as recipe steps: options checked, run by compress, reported, saved and reloaded."""
import json

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.evaluate.tasks import ClassificationTask
from modelpress.recipe import load_recipe
from modelpress.recipe.structure import recorded


def cnn():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 32), nn.Linear(32, 32), nn.ReLU(),
                      nn.Linear(32, 4))
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2)
    return m.eval()


RECIPE = {"name": "replace", "steps": [
    {"fuse": {}},
    {"butterfly": {"ratio": 0.5, "include": ["3"], "fit_steps": 30, "finetune_steps": 5}},
    {"factorize": {"rank": 4, "include": ["7"]}},
    {"product_quantize": {"dim": 4, "entries": 16, "include": ["10"], "finetune_steps": 5}},
    {"quantize": {"weights": "int8", "exclude": ["3", "10"]}},
]}


def test_recipe_of_replacements_runs_reports_and_reloads_bit_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(16, 1, 6, 6, generator=g) for _ in range(4)]
    data = [(x, torch.randint(4, (16,), generator=g)) for x in xs]
    m = cnn()
    report = mp.compress(m, RECIPE, calib=xs, eval=ClassificationTask(data=data), train=data)
    steps = {r["step"]: r for r in report.steps}
    assert steps["fuse"]["fold_bn"] == [["0", "1"]] and steps["fuse"]["fused"] == [["7", "8"]]
    assert list(steps["butterfly"]["chains"]) == ["3"] and steps["butterfly"]["finetune"]["steps"] == 5
    assert steps["factorize"]["ranks"] == {"7": 4}
    assert list(steps["product_quantize"]["layers"]) == ["10"]
    json.dumps(report.to_dict(), default=float)  # the report stays serialisable
    types = {r["name"]: r["type"] for r in report.layers}
    assert types["3"] == "ButterflyConv2d" and types["10"] == "PQLinear" and types["7.down"] == "QuantLinear"
    assert [r["kind"] for r in recorded(m)] == ["fold_bn", "fuse", "butterfly", "factorize", "product_quantize"]
    y = m(xs[0])
    mp.save(m, tmp_path / "r")
    fresh = mp.load(tmp_path / "r", cnn())
    assert torch.equal(fresh(xs[0]), y)
    live = {r.name: (r.type, r.params, r.format, r.bytes) for r in mp.inspect(fresh).rows}
    assert live == {r.name: (r.type, r.params, r.format, r.bytes) for r in mp.inspect(m).rows}
    saved = {r.name: (r.type, r.params, r.format, r.bytes) for r in mp.inspect_saved(tmp_path / "r").rows}
    assert saved["3"] == live["3"] and saved["10"] == live["10"]  # butterfly and PQ layers, read from the folder


def test_step_options_are_checked_and_written_back():
    r = load_recipe(RECIPE)
    assert r.to_dict()["steps"][2] == {"factorize": {"rank": 4, "include": ["7"]}}
    with pytest.raises(ValueError, match="option 'ratio' of recipe step 'factorize' must be"):
        load_recipe({"steps": [{"factorize": {"ratio": "half"}}]})
    with pytest.raises(ValueError, match="unknown option.*'rnak'"):
        load_recipe({"steps": [{"factorize": {"rnak": 4}}]})
    with pytest.raises(ValueError, match="butterfly ratio must be in"):
        load_recipe({"steps": [{"butterfly": {"ratio": 2}}]})
    with pytest.raises(ValueError, match="method"):
        load_recipe({"steps": [{"factorize": {"method": "qr"}}]})


def test_cli_names_a_factorize_step_that_needs_calibration_before_work():
    from modelpress.cli_compress import _needs_calib

    assert _needs_calib(load_recipe({"steps": [{"factorize": {"method": "svd"}}]})) is None
    assert _needs_calib(load_recipe({"steps": [{"fuse": {}}, {"factorize": {"method": "whiten"}}]})) == \
        "step 2 (factorize, method whiten)"
