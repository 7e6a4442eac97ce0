"""Layer selection: fnmatch globs, `re:` regular expressions (full match), include/exclude, first-match lookup."""
import pytest
from torch import nn

from modelpress.select import check_patterns, lookup, matches, matches_any, select_modules, selected


@pytest.mark.parametrize("name, pattern, hit", [
    ("encoder.layer.0.attention.q", "encoder.layer.*.attention.*", True),
    ("encoder.layer.0.attention.q", "encoder.layer.?.attention.q", True),
    ("encoder.layer.10.attention.q", "encoder.layer.?.attention.q", False),
    ("lm_head", "lm_head", True),
    ("model.lm_head", "lm_head", False),  # globs match the whole name
    ("model.lm_head", "*lm_head", True),
    ("Head", "head", False),  # case-sensitive
    ("layers.1.fc", "layers.[0-2].fc", True),
    ("layers.3.fc", "layers.[0-2].fc", False),
    ("blocks.0.q_proj", "re:.*(q|k|v)_proj", True),
    ("blocks.0.o_proj", "re:.*(q|k|v)_proj", False),
    ("blocks.0.q_proj.extra", "re:.*(q|k|v)_proj", False),  # full match, not search
    ("blocks.0.q_proj", "re:q_proj", False),
    ("fc1", r"re:fc\d", True),
    ("fc12", r"re:fc\d", False),
])
def test_matches(name, pattern, hit):
    assert matches(name, pattern) is hit


def test_matches_any_and_selected():
    assert matches_any("a.b", ["x", "a.*"])
    assert not matches_any("a.b", None)
    assert not matches_any("a.b", [])
    assert selected("a.b", None, None)
    assert selected("a.b", ["a.*"], None)
    assert not selected("a.b", ["c.*"], None)
    assert not selected("a.b", None, ["re:a\\..*"])
    assert not selected("a.b", ["a.*"], ["*.b"])  # exclude wins over include
    assert not selected("a.b", [], None)  # an empty include list selects nothing


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.blocks = nn.ModuleList(nn.ModuleDict({"q_proj": nn.Linear(4, 4), "act": nn.ReLU()}) for _ in range(3))
        self.lm_head = nn.Linear(4, 10)


def test_select_modules_include_exclude_types():
    m = Net()
    all_names = [n for n, _ in select_modules(m)]
    assert "" not in all_names  # the root is never selected
    assert all_names == [n for n, _ in m.named_modules() if n]
    lin = [n for n, _ in select_modules(m, types=(nn.Linear,))]
    assert lin == ["blocks.0.q_proj", "blocks.1.q_proj", "blocks.2.q_proj", "lm_head"]
    assert [n for n, _ in select_modules(m, exclude=["lm_head"], types=(nn.Linear,))] == lin[:3]
    assert [n for n, _ in select_modules(m, include=["re:blocks\\.[02]\\..*"], types=(nn.Linear,))] == \
        ["blocks.0.q_proj", "blocks.2.q_proj"]
    picked = select_modules(m, include=["blocks.*"], exclude=["blocks.1.*"], types=(nn.Linear, nn.ReLU))
    assert [n for n, _ in picked] == ["blocks.0.q_proj", "blocks.0.act", "blocks.2.q_proj", "blocks.2.act"]
    assert picked[0][1] is m.blocks[0]["q_proj"]


def test_lookup_first_match_wins():
    plan = {"blocks.0.*": "int8", "re:blocks\\..*": "int4:g32", "*": None}
    assert lookup("blocks.0.q_proj", plan) == "int8"
    assert lookup("blocks.1.q_proj", plan) == "int4:g32"
    assert lookup("lm_head", plan, "fp8") is None  # an explicit None is a value, not "no match"
    assert lookup("lm_head", {"blocks.*": "int8"}, "fp8") == "fp8"
    assert lookup("x", None, 3) == 3
    reordered = {"re:blocks\\..*": "int4:g32", "blocks.0.*": "int8"}
    assert lookup("blocks.0.q_proj", reordered) == "int4:g32"


def test_check_patterns():
    check_patterns(None)
    check_patterns(["a.*", "re:(q|k)_proj", "[ab]"])
    with pytest.raises(ValueError, match=r"re:\(unclosed"):
        check_patterns(["ok", "re:(unclosed"])
    with pytest.raises(ValueError, match=r"re:\*bad"):
        check_patterns(["re:*bad"])
    with pytest.raises(TypeError, match="strings"):
        check_patterns([3])
