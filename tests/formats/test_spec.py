"""Format spec parsing: every element name, canonical round trip, options, and errors that name the bad part."""
import pytest

from modelpress.formats import ELEMENTS, Format, parse_format
from modelpress.formats.spec import ALIASES, MX_ELEMENT


@pytest.mark.parametrize("name", list(ELEMENTS))
def test_every_element_parses(name):
    kind, bits, block = ELEMENTS[name]
    f = parse_format(name)
    assert (f.name, f.kind, f.bits, f.symmetric) == (name, kind, bits, True)
    if block is None:
        assert (f.granularity, f.group_size) == ("channel", None)
        assert f.element == name
    else:
        assert (f.granularity, f.group_size) == ("group", block)
        assert f.element == MX_ELEMENT[name]
    assert str(f) == name
    assert parse_format(str(f)) == f


@pytest.mark.parametrize("alias, target", list(ALIASES.items()))
def test_aliases(alias, target):
    assert parse_format(alias) == parse_format(target)
    assert str(parse_format(alias)) == target


SPECS = ["int8", "int8:tensor", "int8:channel", "int8:sym", "int4:g32", "int4:g32:asym", "int4:asym:g32", "int3:g128",
         "int2:g16:asym", "int2:tensor:asym", "int5:g64", "int1:g32", "ternary:g32", "ternary:tensor", "fp8_e4m3",
         "fp8_e5m2:tensor", "fp6_e3m2:g32", "fp4_e2m1:g16", "mxfp4", "mxint8", "nvfp4", "FP8", " Int4:G32:ASYM "]


@pytest.mark.parametrize("spec", SPECS)
def test_canonical_round_trip(spec):
    f = parse_format(spec)
    assert parse_format(str(f)) == f
    assert str(parse_format(str(f))) == str(f)
    assert parse_format(f) is f


@pytest.mark.parametrize("spec, canonical", [
    ("int8:channel", "int8"), ("int8:sym", "int8"), ("int4:asym:g32", "int4:g32:asym"),
    ("INT4:G32:ASYM", "int4:g32:asym"), ("fp8", "fp8_e4m3"), ("binary:g32", "int1:g32"),
])
def test_canonical_strings(spec, canonical):
    assert str(parse_format(spec)) == canonical


@pytest.mark.parametrize("spec, what", [
    ("int4:g32:g64", "granularity"), ("int4:g32:tensor", "granularity"), ("int4:tensor:channel", "granularity"),
    ("int4:asym:sym", "symmetry"), ("int4:asym:asym", "symmetry"),
])
def test_options_given_twice_are_refused(spec, what):
    with pytest.raises(ValueError, match=f"sets the {what} twice"):
        parse_format(spec)


def test_options():
    assert parse_format("int4:g128") == Format("int4", "int", 4, "group", 128, True)
    assert parse_format("int8:tensor") == Format("int8", "int", 8, "tensor", None, True)
    assert parse_format("int8:channel") == Format("int8", "int", 8, "channel", None, True)
    assert parse_format("int4:g32:asym") == Format("int4", "int", 4, "group", 32, False)
    assert parse_format("int4:sym").symmetric
    assert parse_format("fp8_e4m3:g32").granularity == "group"
    assert parse_format("ternary:g16").bits == 2 and parse_format("int1").kind == "binary"


@pytest.mark.parametrize("spec, bad", [
    ("int9", "int9"), ("int0", "int0"), ("float4", "float4"), ("mxfp5", "mxfp5"), ("foo:g32", "foo"),
    ("int4:g32:bogus", "bogus"), ("int4:gx", "gx"), ("int4:g", "'g'"), ("int4:g-3", "g-3"), ("int4:", "''"),
    ("int4:g0", "group size"),
    ("fp8_e4m3:asym", "asym"), ("fp4_e2m1:g32:asym", "asym"), ("int1:asym", "asym"), ("ternary:asym", "asym"),
    ("mxfp4:asym", "mxfp4"), ("mxfp4:g32", "no options"), ("nvfp4:g16", "no options"), ("mxint8:tensor", "no options"),
    ("", "non-empty"), ("   ", "non-empty"),
])
def test_errors_name_the_bad_part(spec, bad):
    with pytest.raises(ValueError) as e:
        parse_format(spec)
    assert bad in str(e.value)


@pytest.mark.parametrize("spec", [None, 4, b"int4"])
def test_non_string(spec):
    with pytest.raises(ValueError, match="non-empty string"):
        parse_format(spec)
