"""Fuzzing the loader (hypothesis, bounded and deterministic): mutated manifests and tensor files give a clean
ValueError or load the very same model; never another exception, a crash, or a silent load with other outputs.
`MODELPRESS_FUZZ_EXAMPLES=5000` runs a longer, randomised hunt (the default is a fixed set, for CI)."""
import json
import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modelpress as mp
from io_helpers import header, inputs, make, outputs, quantized, with_header, write_tensors

EXAMPLES = int(os.environ.get("MODELPRESS_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="MODELPRESS_FUZZ_EXAMPLES" not in os.environ,
                database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# values that are near-valid are more likely to get past the first checks than random ones
NEAR = ["int4:g32", "fp4_e2m1:g32", "int4:g32:asym", "int4:g64", "int8", "int8:tensor", "fp8_e4m3", "mxfp4", "nvfp4",
        "int8:static", "fp8_e4m3:static", "int8:dynamic", "QuantLinear", "QuantConv2d", "QuantEmbedding", "fc", "conv",
        "emb", "norm.weight", "fc.weight_codes", "fc.bias", "model.safetensors", "../model.safetensors",
        "/etc/passwd", "fold_bn", [["conv", "norm"]], [24, 32], [4, 2, 3, 3], [16, 32], 0, 1, -1, 2**63, True, None]
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**65, 2**65) | st.floats() | st.text(max_size=10),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=5)
VALUE = st.sampled_from(NEAR) | JSON


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    m = quantized()
    path = mp.save(m, tmp_path_factory.mktemp("base") / "q")
    return path, outputs(m)


def fresh(base, tmp_path_factory):
    path, _ = base
    d = tmp_path_factory.mktemp("case") / "q"
    shutil.copytree(path, d)
    return d


def load_or_refuse(path):
    """The loaded model, or None when refused with a ValueError (anything else fails the test)."""
    try:
        return mp.load(path, make(seed=3))
    except ValueError:
        return None


def mutate(data, tree):
    """A copy of the JSON `tree` with one place changed: a value replaced, a key deleted or added."""
    tree = json.loads(json.dumps(tree))
    node, path = tree, []
    while isinstance(node, (dict, list)) and node and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(node) if isinstance(node, dict) else list(range(len(node)))))
        path.append(key)
        node = node[key]
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if not path:
        if isinstance(tree, dict):
            tree[data.draw(st.text(max_size=8))] = data.draw(VALUE)
        return tree
    parent = tree
    for k in path[:-1]:
        parent = parent[k]
    if action == "delete":
        del parent[path[-1]]
    elif action == "add" and isinstance(node, dict):
        node[data.draw(st.sampled_from(["weights", "activations", "shape", "smooth", "type", "file", "x"]) |
                       st.text(max_size=6))] = data.draw(VALUE)
    else:
        parent[path[-1]] = data.draw(VALUE)
    return tree


@FUZZ
@given(data=st.data())
def test_mutated_manifest_is_refused_or_identical(base, tmp_path_factory, data):
    path = fresh(base, tmp_path_factory)
    mf = path / "modelpress.json"
    original = json.loads(mf.read_text())
    changed = mutate(data, original)
    mf.write_text(json.dumps(changed))
    model = load_or_refuse(path)
    if model is not None:
        assert torch.equal(outputs(model), base[1]), f"loaded with other outputs after {changed}"
    try:
        mp.inspect_saved(path)
    except ValueError:
        pass


@FUZZ
@given(data=st.data())
def test_mutated_tensor_file_is_refused_or_loads(base, tmp_path_factory, data):
    """Byte flips, truncation and header edits, with the manifest's checksum and size updated (a consistent
    edit): the header and tensor checks must refuse what is inconsistent; what loads must run."""
    path = fresh(base, tmp_path_factory)
    raw = bytearray((path / "model.safetensors").read_bytes())
    kind = data.draw(st.sampled_from(["flip", "truncate", "append", "header"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    elif kind == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "append":
        raw += data.draw(st.binary(min_size=1, max_size=64))
    else:
        h, body = header(bytes(raw))
        raw = bytearray(with_header(mutate(data, h), body))
    write_tensors(path, bytes(raw))
    model = load_or_refuse(path)
    if model is not None:
        with torch.no_grad():
            model(*inputs())  # runs (values may differ: a consistent edit of the values is a different model)
    try:
        mp.inspect_saved(path)
    except ValueError:
        pass


@FUZZ
@given(pos=st.integers(0, 10**6), value=st.integers(0, 255))
def test_any_changed_byte_without_a_new_checksum_is_refused(base, tmp_path_factory, pos, value):
    path = fresh(base, tmp_path_factory)
    raw = bytearray((path / "model.safetensors").read_bytes())
    pos %= len(raw)
    if raw[pos] == value:
        value ^= 1
    raw[pos] = value
    write_tensors(path, bytes(raw), fix_manifest=False)
    with pytest.raises(ValueError, match="checksum"):
        mp.load(path, make())
