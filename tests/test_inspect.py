"""inspect / inspect_saved: true bytes, equal to what `save` writes, per layer and in total."""
import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import modelpress as mp
from modelpress import QuantConfig, quantize_


def small_model(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                      nn.Linear(8 * 4 * 4, 64), nn.LayerNorm(64), nn.Linear(64, 10))
    m.register_parameter("temperature", nn.Parameter(torch.ones(())))  # a root-level tensor
    return m.eval()


def stored_bytes(path):
    return sum(t.numel() * t.element_size() for t in load_file(str(path / "model.safetensors")).values())


@pytest.mark.parametrize("spec", ["int8", "int4:g32", "int3:g32", "mxfp4", "nvfp4", "fp8_e4m3"])
def test_totals_equal_saved_bytes(spec, tmp_path):
    m = small_model()
    quantize_(m, QuantConfig(weights=spec, weight_observer="minmax"))
    path = mp.save(m, tmp_path / "q")
    manifest = json.loads((path / "modelpress.json").read_text())
    live, saved = mp.inspect(m), mp.inspect_saved(path)
    assert live.total_bytes == saved.total_bytes == manifest["tensors"]["tensor_bytes"] == stored_bytes(path)
    assert live.total_params == saved.total_params
    # per layer: same names, bytes and (for quantized layers) parameter counts and formats
    assert {r.name: r.bytes for r in live.rows} == {r.name: r.bytes for r in saved.rows}
    lrows, srows = {r.name: r for r in live.rows}, {r.name: r for r in saved.rows}
    for name in ("0", "4", "6"):
        assert (lrows[name].params, lrows[name].format, lrows[name].type) == \
               (srows[name].params, srows[name].format, srows[name].type)
    assert lrows["4"].params == 128 * 64 + 64
    assert lrows["(root)"].params == 1 and lrows["(root)"].bytes == 4
    assert lrows["1"].bytes == (8 + 8 + 8 + 8) * 4 + 8  # BatchNorm: weight, bias, running mean/var, int64 counter
    # the file is the tensors plus a small header: 8 bytes of length and the JSON header
    file_bytes = (path / "model.safetensors").stat().st_size
    assert file_bytes == manifest["tensors"]["file_bytes"]
    header = file_bytes - manifest["tensors"]["tensor_bytes"]
    with open(path / "model.safetensors", "rb") as f:
        assert header == 8 + int.from_bytes(f.read(8), "little")
    assert 0 < header < 64 * 1024


@pytest.mark.parametrize("spec, bits", [("int4:g32", 4.5), ("int4:g128", 4.125), ("int8", 8 + 32 / 256),
                                        ("mxfp4", 4.25), ("nvfp4", 4.5 + 32 / 65536), ("int2:g16:asym", 3.5),
                                        ("fp8_e4m3", 8 + 32 / 256)])
def test_bits_per_param_of_weight(spec, bits):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 256, bias=False), nn.Linear(256, 256))
    quantize_(m, QuantConfig(weights=spec, weight_observer="minmax"))
    rows = {r.name: r for r in mp.inspect(m).rows}
    assert rows["0"].params == 65536
    assert rows["0"].bits_per_param == pytest.approx(bits, abs=1e-12)
    assert rows["0"].bits_per_param == pytest.approx(mp.bits_per_param(spec, (256, 256)), abs=1e-12)
    weight_part = (rows["1"].bytes - 256 * 4) * 8 / 65536  # the bias stays fp32
    assert weight_part == pytest.approx(bits, abs=1e-12)
    assert rows["1"].params == 65536 + 256


def test_float_model_and_tied_weights():
    torch.manual_seed(0)
    emb, head = nn.Embedding(100, 16), nn.Linear(16, 100, bias=False)
    head.weight = emb.weight
    m = nn.Sequential(emb, nn.Linear(16, 16), head)
    t = mp.inspect(m)
    assert t.total_params == 100 * 16 + 16 * 16 + 16  # the tied weight counted once
    assert t.total_bytes == 4 * t.total_params
    assert [r.name for r in t.rows] == ["0", "1"]
    assert t.rows[0].format == "float32" and t.rows[0].bits_per_param == 32.0


def test_table_and_dict(tmp_path):
    m = small_model()
    quantize_(m, QuantConfig(weights="int4:g32", activations="int8", weight_observer="minmax"))
    t = mp.inspect(m)
    d = json.loads(json.dumps(t.to_dict()))
    assert d["total_bytes"] == t.total_bytes and d["total_params"] == t.total_params
    row = next(r for r in d["layers"] if r["name"] == "4")
    assert (row["type"], row["format"]) == ("QuantLinear", "int4:g32 a:int8")
    assert row["bits_per_param"] == round(8 * row["bytes"] / row["params"], 4)
    text = str(t)
    assert "QuantLinear" in text and "int4:g32 a:int8" in text
    assert text.splitlines()[-1].split()[0] == "total" and f"{t.total_bytes:,d}" in text.splitlines()[-1]
    path = mp.save(m, tmp_path / "q")
    assert next(r for r in mp.inspect_saved(path).rows if r.name == "4").format == "int4:g32 a:int8"


def test_inspect_saved_corrupt_header(tmp_path):
    m = small_model()
    quantize_(m, "int8")
    path = mp.save(m, tmp_path / "q")
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:12] = b"\xff\xfe{{"
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum does not match"):
        mp.inspect_saved(path)
    mf = path / "modelpress.json"  # a consistent edit (checksum updated): the header itself is checked
    manifest = json.loads(mf.read_text())
    manifest["tensors"]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    mf.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        mp.inspect_saved(path)
    with pytest.raises(FileNotFoundError):
        mp.inspect_saved(tmp_path / "missing")


def test_kernel_paths_listed_after_a_call():
    m = small_model()
    quantize_(m, QuantConfig(weights="int8", activations="int8", weight_observer="minmax"))
    assert all(not r.kernels for r in mp.inspect(m).rows)  # nothing ran yet
    with torch.no_grad():
        m(torch.randn(3, 3, 4, 4))
    t = mp.inspect(m)
    quant = [r for r in t.rows if r.kernels]
    assert [r.type for r in quant] == ["QuantConv2d", "QuantLinear", "QuantLinear"]
    assert all(k["rows"] == 4 and k["path"] and k["source"] == "static" for r in quant for k in r.kernels)
    assert t.kernel_mode == "memory" and "kernels: mode memory" in str(t)
    assert json.loads(json.dumps(t.to_dict()))["layers"][[r.name for r in t.rows].index(quant[0].name)]["kernels"]


def test_kernel_copies_are_counted_apart_from_the_stored_bytes():
    """A kept kernel layout (here an fp8 layer's bf16 copy on CPUs that run it, or speed mode's dense copy) is
    listed under the total: memory the model holds while running, not bytes `save` writes."""
    m = nn.Sequential(nn.Linear(256, 128)).eval()
    quantize_(m, QuantConfig(weights="int8"))
    mp.set_kernels(m, True, mode="speed")
    with torch.no_grad():
        for rows in (3, 64, 64):
            m(torch.randn(rows, 256))
    t = mp.inspect(m)
    per_path = {}
    for k in t.rows[0].kernels:
        per_path[k["path"]] = k["extra_bytes"] or 0
    assert t.kernel_bytes == sum(per_path.values())  # each kept state once per layer, whatever the buckets
    assert t.to_dict()["kernel_bytes"] == t.kernel_bytes and t.total_bytes == mp.evaluate.model_bytes(m)
    if t.kernel_bytes:
        assert "+ kernel copies in memory" in str(t) and f"{t.kernel_bytes:,}" in str(t)
    else:
        assert "kernel copies" not in str(t)


def test_long_layer_names_widen_the_column_then_keep_their_tails():
    import modelpress as mp

    m = torch.nn.Sequential()
    for name in ("decoder__block__0__layer__1__EncDecAttention__q", "decoder__block__0__layer__1__EncDecAttention__k",
                 "x" * 100):
        m.add_module(name, torch.nn.Linear(4, 4))
    mp.quantize_(m, "int8")
    text = str(mp.inspect(m))
    assert "EncDecAttention__q " in text and "EncDecAttention__k " in text  # told apart (40 characters did not)
    assert "…" + "x" * 71 + " " in text
