"""QuantConfig: validation when built, errors that name the problem, to_dict / from_dict round trip."""
import json

import pytest

from modelpress import QuantConfig


def test_defaults():
    c = QuantConfig()
    assert (c.weights, c.activations, c.include, c.exclude, c.overrides) == ("int8", None, None, None, None)
    assert (c.weight_observer, c.act_observer, c.percentile) == ("auto", "minmax", 99.99)


def test_patterns_become_tuples():
    c = QuantConfig(include="blocks.*", exclude=["lm_head", "re:.*norm"])
    assert c.include == ("blocks.*",)
    assert c.exclude == ("lm_head", "re:.*norm")
    hash(c)  # frozen and hashable once lists are tuples (overrides unset)


@pytest.mark.parametrize("kwargs, match", [
    ({"weights": "int9"}, r"unknown number format 'int9'"),
    ({"weights": "int4:g32:wat"}, r"unknown option 'wat'"),
    ({"weights": "mxfp4:g16"}, r"takes no options"),
    ({"weights": "fp8_e4m3:asym"}, r"symmetric by construction"),
    ({"activations": "int16"}, r"unsupported activation format 'int16'"),
    ({"activations": "int8:perchannel"}, r"unknown activation option 'perchannel'"),
    ({"weight_observer": "max"}, r"weight_observer must be one of .*'max'"),
    ({"act_observer": "hist"}, r"act_observer must be one of .*'hist'"),
    ({"percentile": 40.0}, r"percentile must be in \(50, 100\]"),
    ({"percentile": 100.5}, r"percentile"),
    ({"weights": None}, r"quantizes nothing"),
    ({"weights": None, "activations": None, "overrides": {}}, r"quantizes nothing"),
    ({"overrides": {"lm_head": "int5:g0"}}, r"group size must be positive"),
    ({"overrides": {"lm_head": "float16"}}, r"unknown number format 'float16'"),
    ({"include": ["re:(q"]}, r"re:\(q"),
    ({"exclude": ["re:[x"]}, r"re:\[x"),
    ({"overrides": {"re:+a": "int8"}}, r"re:\+a"),
])
def test_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)


def test_only_overrides_or_activations_is_enough():
    assert QuantConfig(weights=None, overrides={"lm_head": "int8"}).overrides == {"lm_head": "int8"}
    assert QuantConfig(weights=None, activations="int8").activations == "int8"
    assert QuantConfig(weights="int8", overrides={"lm_head": None}).overrides == {"lm_head": None}


FULL = QuantConfig(weights="int4:g32:asym", activations="int8:static", include=["blocks.*"], exclude="lm_head",
                   overrides={"blocks.0.*": "int8", "blocks.1.*": None}, weight_observer="mse",
                   act_observer="percentile", percentile=99.5)


@pytest.mark.parametrize("c", [QuantConfig(), QuantConfig(weights="nvfp4", activations="fp8_e4m3"), FULL])
def test_round_trip(c):
    d = c.to_dict()
    assert json.loads(json.dumps(d)) == d  # plain JSON types
    back = QuantConfig.from_dict(d)
    assert back == c
    assert back.to_dict() == d


def test_to_dict_values():
    d = FULL.to_dict()
    assert d == {"weights": "int4:g32:asym", "activations": "int8:static", "include": ["blocks.*"],
                 "exclude": ["lm_head"], "overrides": {"blocks.0.*": "int8", "blocks.1.*": None},
                 "weight_observer": "mse", "act_observer": "percentile", "percentile": 99.5}


def test_from_dict_partial_and_unknown_key():
    assert QuantConfig.from_dict({"weights": "int4:g128"}) == QuantConfig(weights="int4:g128")
    with pytest.raises(ValueError, match=r"unknown QuantConfig option\(s\) \['bits', 'wieghts'\]"):
        QuantConfig.from_dict({"wieghts": "int8", "bits": 4})
    with pytest.raises(ValueError, match=r"unknown number format"):
        QuantConfig.from_dict({"weights": "int0"})


def test_frozen():
    with pytest.raises(Exception):
        QuantConfig().weights = "int4"
