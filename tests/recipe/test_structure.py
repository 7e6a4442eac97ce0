"""Structural changes are recorded on the model, saved in the manifest and replayed by load."""
import json

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.recipe import Context
from modelpress.recipe.structure import record, recorded, replay


def cnn():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5))
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
    return m.eval()


def test_fold_bn_is_recorded_and_reloads_onto_a_fresh_float_model(tmp_path):
    m, x = cnn(), torch.randn(2, 1, 8, 8)
    mp.fold_bn_(m)
    assert recorded(m) == [{"kind": "fold_bn", "options": {"pairs": [["0", "1"]]}}]
    mp.quantize_(m, "int8")
    y = m(x)
    mp.save(m, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "modelpress.json").read_text())["structure"][0]["kind"] == "fold_bn"
    fresh = cnn()
    loaded = mp.load(tmp_path / "q", fresh)
    assert loaded is fresh and isinstance(fresh[1], nn.Identity)
    assert torch.equal(fresh(x), y)


def test_load_onto_an_already_folded_model_and_a_failed_load_changes_nothing(tmp_path):
    m = cnn()
    mp.fold_bn_(m)
    mp.quantize_(m, "int8")
    mp.save(m, tmp_path / "q")
    pre = cnn()
    mp.fold_bn_(pre)  # the old way: the user folded first
    mp.load(tmp_path / "q", pre)
    assert isinstance(pre[0], mp.QuantConv2d)
    wrong = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())  # no BN to fold
    before = {k: v.clone() for k, v in wrong.state_dict().items()}
    with pytest.raises(ValueError, match="no foldable pair"):
        mp.load(tmp_path / "q", wrong)
    assert isinstance(wrong[1], nn.ReLU) and recorded(wrong) == []
    assert all(torch.equal(v, wrong.state_dict()[k]) for k, v in before.items())


def test_bad_records_are_refused():
    m = cnn()
    with pytest.raises(KeyError, match="no replay function"):
        record(m, "teleport")
    with pytest.raises(ValueError, match="not valid"):
        replay(m, [{"kind": "teleport", "options": {}}])
    with pytest.raises(ValueError, match="must be a list"):
        replay(m, {"kind": "fold_bn"})


def test_context_helpers():
    ctx = Context()
    assert ctx.time_left() is None
    with pytest.raises(ValueError, match="needs calibration data"):
        ctx.need_calib("prune")
    ctx.report("prune", sparsity=0.5)
    assert ctx.records == [{"step": "prune", "sparsity": 0.5}]


def test_compress_reports_step_records():
    from modelpress.recipe import Recipe
    from modelpress.recipe.steps import Step
    from dataclasses import dataclass
    from typing import ClassVar

    @dataclass(frozen=True)
    class Note(Step):
        kind: ClassVar[str] = "note"
        text: str = "hi"

        def run(self, model, ctx):
            ctx.report(self.kind, text=self.text, calib=len(ctx.calib), teacher=ctx.reference is not model)

    m = cnn()
    r = mp.compress(m, Recipe("r", (Note("x"),)), calib=[torch.randn(1, 1, 8, 8)], latency_input=None)
    assert r.steps == [{"step": "note", "text": "x", "calib": 1, "teacher": True}]
    assert Note.from_options({"text": "y"}) == Note("y") and Note("y").to_dict() == {"note": {"text": "y"}}
