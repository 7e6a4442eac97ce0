"""A saved folder is checked before anything is built from it: edited manifests that would load with other
outputs, files outside the folder, absurd headers, missing fields; errors name the problem, and the files and
the float model are left as they were."""
import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import modelpress as mp
from io_helpers import (header, inputs, make, manifest, outputs, quantized, same_model, with_header,
                        write_manifest, write_tensors)


@pytest.fixture
def saved(tmp_path):
    m = quantized()
    return m, mp.save(m, tmp_path / "q")


def refused(path, match):
    """load (onto a fresh float model) and inspect_saved both refuse the folder; the float model is unchanged."""
    f = make()
    before = {k: v.clone() for k, v in f.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        mp.load(path, f)
    assert all(torch.equal(v, f.state_dict()[k]) for k, v in before.items())
    assert type(f.fc) is torch.nn.Linear
    with pytest.raises(ValueError, match=match):
        mp.inspect_saved(path)


@pytest.mark.parametrize("layer, field, value", [
    ("fc", "weights", "fp4_e2m1:g32"),  # same bytes as int4:g32: loaded silently with other outputs before
    ("emb", "weights", "fp8_e4m3"),  # same bytes as int8
    ("conv", "weights", "int8:tensor"),
    ("fc", "activations", "fp8_e4m3:static"),  # same buffers as int8:static
    ("fc", "activations", None),
])
def test_edited_layer_format_is_refused(saved, layer, field, value):
    _, path = saved
    m = manifest(path)
    m["layers"][layer][field] = value
    write_manifest(path, m)
    refused(path, f"layer '{layer}' is .* in the manifest but the tensor file was written for .*edited")


def test_edits_are_caught_by_the_tensor_checks_too(saved):
    """Without the stored records (files of earlier versions), formats are still checked against the tensors."""
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    h, body = header(data)
    del h["__metadata__"]["modelpress"]
    write_tensors(path, with_header(h, body))
    for layer, spec, match in [("fc", "int4:g32:asym", r"needs tensor fc.weight_zero"),
                               ("fc", "int4:g16", r"fc.weight_scale should be BF16 \[24, 2\]"),
                               ("conv", "int4", r"conv.weight_codes should be U8 \[36\]"),
                               ("emb", "int8:asym", r"needs tensor emb.weight_zero")]:
        m = manifest(path)
        original = m["layers"][layer]["weights"]
        m["layers"][layer]["weights"] = spec
        write_manifest(path, m)
        refused(path, match)
        m["layers"][layer]["weights"] = original
        write_manifest(path, m)
    m = manifest(path)
    m["layers"]["fc"]["activations"] = None  # input_scale / input_zero left over
    write_manifest(path, m)
    refused(path, r"unexpected tensor\(s\) \['fc.input_scale', 'fc.input_zero'\]")


@pytest.mark.parametrize("name", ["/etc/passwd", "../q2/model.safetensors", "..", "sub/model.safetensors",
                                  "link.safetensors"])
def test_tensor_file_must_stay_inside_the_folder(saved, tmp_path, name):
    _, path = saved
    (tmp_path / "q2").mkdir()
    os.symlink("/etc/passwd", path / "link.safetensors")
    m = manifest(path)
    m["tensors"]["file"] = name
    write_manifest(path, m)
    refused(path, "'tensors.file' must name a file inside the folder")


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.pop("tensors"), "'tensors' is missing"),
    (lambda m: m.pop("layers"), "'layers' is missing"),
    (lambda m: m.update(layers=[]), "'layers' is missing or not an object"),
    (lambda m: m["tensors"].update(file_bytes="10"), "'tensors.file_bytes' must be a non-negative integer"),
    (lambda m: m["tensors"].update(sha256=None), "'tensors.sha256' must be 64 hex digits"),
    (lambda m: m.update(format_version="1"), "'format_version' must be a positive integer"),
    (lambda m: m["layers"]["fc"].update(shape=[24]), r"'shape' of a QuantLinear must be 2 positive integers"),
    (lambda m: m["layers"]["fc"].update(type="QuantFoo"), "'type' must be one of"),
    (lambda m: m["layers"]["fc"].update(weights="int9"), "layer 'fc'.*unknown number format 'int9'"),
    (lambda m: m["layers"]["emb"].update(activations="int8"), "a QuantEmbedding is quantized weight-only: it has no activation format"),
    (lambda m: m["layers"]["conv"].update(smooth=True), "'smooth' applies to QuantLinear only"),
    (lambda m: m.update(aliases={"x": 1}), "'aliases' must map tensor names"),
    (lambda m: m.update(aliases={"fc.weight_codes": "conv.weight_codes"}), "'aliases' differs"),
    (lambda m: m.update(structure={}), "'structure' must be a list"),
    (lambda m: m.update(buffers=["nope"]), "'buffers' differs|buffer 'nope' is not in the tensor file"),
    (lambda m: m["tensors"].update(tensor_bytes=5), "'tensors.tensor_bytes' is 5"),
    # values Python holds and torch cannot take (an int64 overflow, a NUL in a path)
    (lambda m: m["layers"]["fc"].update(shape=[2**63, 32]), "'shape' of a QuantLinear must be 2 positive integers"),
    (lambda m: m["tensors"].update(file="a\u0000b"), "'tensors.file' must name a file inside the folder"),
])
def test_manifest_fields_are_checked(saved, edit, match):
    _, path = saved
    m = manifest(path)
    edit(m)
    write_manifest(path, m)
    refused(path, match)


@pytest.mark.parametrize("claimed", [10**12, 2**64 - 1, 7])
def test_absurd_header_length_is_a_clean_error(saved, claimed):
    """A header length of 1e12 made inspect allocate it (MemoryError); checksums updated, so the header itself
    is what is judged."""
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    write_tensors(path, claimed.to_bytes(8, "little") + data[8:])
    refused(path, "corrupt safetensors header")


@pytest.mark.parametrize("edit, match", [
    (lambda h: h["fc.weight_codes"].update(dtype="I32"), r"fc.weight_codes.*bytes stored"),
    (lambda h: h["fc.weight_scale"].update(shape=[24, 2, 1]), r"bytes stored"),
    (lambda h: h["fc.weight_codes"].update(data_offsets=[0, 10**9]), r"outside the file"),
    (lambda h: h["fc.weight_codes"].update(dtype="F4"), r"unsupported dtype"),
    (lambda h: h.pop("conv.bias"), r"missing|tensor_bytes"),
])
def test_header_entries_are_checked(saved, edit, match):
    _, path = saved
    h, body = header((path / "model.safetensors").read_bytes())
    edit(h)
    write_tensors(path, with_header(h, body))
    refused(path, match)


def test_truncated_tensor_file_fails_inspect(saved):
    """inspect read the header only: a truncated file gave a normal table (and exit 0)."""
    _, path = saved
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    with pytest.raises(ValueError, match="truncated"):
        mp.inspect_saved(path)


def test_loading_into_a_quantized_model_says_so(saved):
    m, path = saved
    with pytest.raises(ValueError, match=r"already quantized \(layer 'emb' is QuantEmbedding\).*float architecture"):
        mp.load(path, m)
    assert same_model(m, mp.load(path, make(seed=5)))


def test_loading_into_a_meta_model_says_so(saved):
    _, path = saved
    with torch.device("meta"):
        f = make()
    with pytest.raises(ValueError, match="meta device"):
        mp.load(path, f)


def test_saving_a_meta_model_says_so(tmp_path):
    with torch.device("meta"):
        f = make()
    with pytest.raises(ValueError, match="meta device"):
        mp.save(f, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_valid_folder_still_loads_bit_exactly(saved):
    m, path = saved
    assert same_model(m, mp.load(path, make(seed=7)))
    h, _ = header((path / "model.safetensors").read_bytes())
    stored = json.loads(h["__metadata__"]["modelpress"])
    assert stored["layers"] == manifest(path)["layers"] and stored["layers"]["fc"]["weights"] == "int4:g32"


def test_files_of_earlier_versions_without_stored_records_load(saved, tmp_path):
    m, path = saved
    t = load_file(str(path / "model.safetensors"))
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})
    write_tensors(path, (path / "model.safetensors").read_bytes())
    assert same_model(m, mp.load(path, make(seed=7)))
    assert torch.equal(outputs(m), mp.load(path, make(seed=8))(*inputs()))


def test_siblings_wrong_argument_types_and_deep_json(saved, tmp_path):
    m, path = saved
    with pytest.raises(TypeError, match="load needs the float model .* got int"):
        mp.load(path, 5)
    with pytest.raises(TypeError, match="save needs an nn.Module, got OrderedDict"):
        mp.save(m.state_dict(), tmp_path / "sd")
    (path / "modelpress.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="corrupt"):
        mp.load(path, make())


def test_hugging_face_config_naming_a_non_model_is_refused(tmp_path):
    """mp.load(folder) builds the architecture its config.json names: only a transformers model class."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=32)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).eval()
    mp.quantize_(m, "int8")
    path = mp.save(m, tmp_path / "hf")
    man = json.loads((path / "modelpress.json").read_text())
    del man["hf_config_sha256"]  # as a folder saved before the checksum was recorded (else any edit is refused)
    (path / "modelpress.json").write_text(json.dumps(man))
    c = json.loads((path / "config.json").read_text())
    for arch, match in [("pipeline", "'pipeline', which is not a transformers model class"),
                        ("LlamaForCausalLM", None)]:
        c["architectures"] = [arch]
        (path / "config.json").write_text(json.dumps(c))
        if match:
            with pytest.raises(ValueError, match=match):
                mp.load(path)
        else:
            ids = torch.randint(0, 32, (1, 5))
            assert torch.equal(mp.load(path)(ids).logits, m(ids).logits)
    c["hidden_size"] = 17  # does not divide into the heads
    (path / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match="config.json"):
        mp.load(path)


class Multi(torch.nn.Module):
    """Layers that quantize several matrices (MultiheadAttention's in_proj, LSTM weights)."""

    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.lstm = torch.nn.LSTM(16, 8, batch_first=True)

    def forward(self, x):  # [B, T, 16]
        return self.lstm(self.attn(x, x, x)[0])[0]


def test_multi_matrix_layers_are_validated(tmp_path):
    torch.manual_seed(0)
    m = Multi().eval()
    mp.quantize_(m, "int4:g16")
    path = mp.save(m, tmp_path / "q")
    x = torch.randn(2, 3, 16)
    torch.manual_seed(1)
    assert torch.equal(mp.load(path, Multi().eval())(x), m(x))
    mf = manifest(path)
    assert set(mf["layers"]["lstm"]["shapes"]) == {"weight_ih_l0", "weight_hh_l0"}
    h, body = header((path / "model.safetensors").read_bytes())
    del h["__metadata__"]["modelpress"]  # without the stored records, the tensor checks judge alone
    write_tensors(path, with_header(h, body))
    mf = manifest(path)
    mf["layers"]["lstm"]["shapes"]["weight_hh_l0"] = [32, 16]
    write_manifest(path, mf)
    with pytest.raises(ValueError, match=r"lstm.weight_hh_l0_codes should be U8"):
        mp.load(path, Multi().eval())
    mf["layers"]["lstm"]["shapes"] = {"weight_ih_l0": [32, 16]}  # one matrix forgotten
    write_manifest(path, mf)
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) \['lstm.weight_hh_l0_codes'"):
        mp.load(path, Multi().eval())
    mf["layers"]["attn"]["activations"] = "int8"
    write_manifest(path, mf)
    with pytest.raises(ValueError, match="QuantMultiheadAttention is quantized weight-only"):
        mp.load(path, Multi().eval())


def _saved_llama(tmp_path):
    """(transformers, config, an int8 tiny Llama, its saved folder)"""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=32)
    m = transformers.LlamaForCausalLM(cfg).eval()
    mp.quantize_(m, "int8")
    return transformers, cfg, m, mp.save(m, tmp_path / "hf")


@pytest.mark.parametrize("key, value", [("num_hidden_layers", 10**6), ("vocab_size", 10**9), ("use_cache", False)])
def test_hugging_face_config_changed_after_saving_is_refused_before_building(tmp_path, key, value):
    """load builds the model from config.json before it can compare tensors: a changed config.json (a layer count
    that would build for minutes, a vocabulary that would exhaust the memory) is refused by its checksum first."""
    transformers, cfg, m, path = _saved_llama(tmp_path)
    c = json.loads((path / "config.json").read_text())
    c[key] = value
    (path / "config.json").write_text(json.dumps(c))
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="config.json was changed after the model was saved"):
        mp.load(path)
    assert time.perf_counter() - t0 < 5
    mp.load(path, transformers.LlamaForCausalLM(cfg))  # the float model given: config.json is not read
    with pytest.raises(ValueError, match="config.json was changed"):
        mp.load(path, path)  # (the folder itself as the float model: the same check)


def test_hugging_face_config_checksum_ignores_formatting(tmp_path):
    """indentation, key order and a git checkout's CRLF line endings are not changes"""
    transformers, cfg, m, path = _saved_llama(tmp_path)
    c = json.loads((path / "config.json").read_text())
    (path / "config.json").write_bytes(json.dumps(dict(reversed(list(c.items()))), indent=4).replace("\n", "\r\n").encode())
    ids = torch.randint(0, 32, (1, 5))
    assert torch.equal(mp.load(path)(ids).logits, m(ids).logits)


def _rewrite_tensor(path, key, change):
    """Change the values of one stored tensor, keeping the file consistent (header, stored records, checksum):
    what only the values can show."""
    f = path / "model.safetensors"
    h, _ = header(f.read_bytes())
    tensors = load_file(str(f))
    tensors[key] = change(tensors[key].clone())
    save_file(tensors, str(f), metadata=h["__metadata__"])
    write_tensors(path, f.read_bytes())


@pytest.mark.parametrize("spec, leaf, change, match", [
    ("int4:g32", "scale", lambda t: t.index_fill_(0, torch.tensor([0]), float("nan")), "a scale is NaN or infinite"),
    ("int8", "scale", lambda t: t.index_fill_(0, torch.tensor([1]), float("inf")), "a scale is NaN or infinite"),
    ("int4:g32:asym", "zero", lambda t: t.index_fill_(0, torch.tensor([0]), 16), "a zero point is beyond the 16 codes"),
    ("mxfp4", "scale", lambda t: t.index_fill_(0, torch.tensor([0]), 255), "255, the NaN of E8M0"),
    ("nvfp4", "scale", lambda t: t.index_fill_(0, torch.tensor([0]), 0x7F), "a NaN fp8_e4m3 code"),
    ("nvfp4", "global_scale", lambda t: t.fill_(float("nan")), "its tensor scale is not finite"),
    ("fp8_e4m3", "codes", lambda t: t.index_fill_(0, torch.tensor([5]), 0xFF), "codes outside the finite range"),
    ("mxfp8", "codes", lambda t: t.index_fill_(0, torch.tensor([7]), 0x7F), "codes outside the finite range"),
])
def test_values_no_save_writes_are_refused_at_load(tmp_path, spec, leaf, change, match):
    """Scales, zero points and codes with values quantization never writes load as NaN or wrong outputs: refused,
    naming the layer, before the float model is touched."""
    m = make()
    mp.quantize_(m, mp.QuantConfig(weights=spec, include=["fc"]))
    path = mp.save(m, tmp_path / "q")
    _rewrite_tensor(path, f"fc.weight_{leaf}", change)
    f = make()
    with pytest.raises(ValueError, match=f"model.safetensors: layer 'fc' .*{match}.*damaged"):
        mp.load(path, f)
    assert type(f.fc) is torch.nn.Linear


@pytest.mark.parametrize("spec", ["int8:asym", "int8:tensor:asym", "int8:g32:asym", "int4:g32:asym", "int2:g16:asym",
                                  "fp8_e4m3", "fp8_e5m2", "mxfp8", "nvfp4", "mxfp4"])
def test_the_value_checks_pass_every_format_saved(tmp_path, spec):
    """(zero points are uint8: 2**8 wrapped to 0 in a first version of the check, refusing every int8:asym model)"""
    m = make()
    mp.quantize_(m, mp.QuantConfig(weights=spec, include=["fc"]))
    path = mp.save(m, tmp_path / "q")
    assert same_model(mp.load(path, make()), m)


def test_a_bitmask_that_disagrees_with_nnz_is_refused_at_load(tmp_path):
    """A pruned weight's bitmask keeping more values than the codes stored loaded, then failed at the first call."""
    m = make()
    mp.prune_(m, mp.PruneConfig(sparsity=0.5, include=["fc"]))
    mp.quantize_(m, mp.QuantConfig(weights="int4:g32", include=["fc"]))
    path = mp.save(m, tmp_path / "q")
    assert manifest(path)["layers"]["fc"]["nnz"] is not None
    _rewrite_tensor(path, "fc.weight_mask", lambda t: t.index_fill_(0, torch.tensor([0]), 0xFF))
    with pytest.raises(ValueError, match="layer 'fc' .*bitmask keeps .* values"):
        mp.load(path, make())
    # one value fewer: the same number of int4 code bytes when the count was even, still refused (against 'nnz')
    path = mp.save(m, tmp_path / "q2")
    mask = load_file(str(path / "model.safetensors"))["fc.weight_mask"]
    byte = int(torch.nonzero(mask).flatten()[0])
    bit = (int(mask[byte]) & -int(mask[byte])).bit_length() - 1
    _rewrite_tensor(path, "fc.weight_mask", lambda t: t.index_fill_(0, torch.tensor([byte]), int(t[byte]) & ~(1 << bit)))
    with pytest.raises(ValueError, match="layer 'fc' .*bitmask keeps .* values, the codes stored are those of"):
        mp.load(path, make())


def test_static_input_ranges_must_be_finite(tmp_path):
    m = make()
    mp.quantize_(m, mp.QuantConfig(weights="int8", activations="int8:static", include=["fc"]),
                 calib=[inputs(seed=s) for s in range(2)])
    path = mp.save(m, tmp_path / "q")
    _rewrite_tensor(path, "fc.input_scale", lambda t: t.fill_(float("nan")))
    with pytest.raises(ValueError, match="fc.input_scale holds NaN"):
        mp.load(path, make())


def test_a_number_too_long_to_read_is_a_corrupt_manifest(saved):
    _, path = saved
    text = (path / "modelpress.json").read_text().replace('"format_version": 1', '"format_version": ' + "9" * 5000)
    (path / "modelpress.json").write_text(text)
    refused(path, "is corrupt")


def test_a_layer_record_without_activations_reads_as_weight_only(tmp_path):
    """(the manifest check treats a missing 'activations' as none; load and inspect read it the same way)"""
    m0 = make()
    mp.quantize_(m0, "int8")
    path = mp.save(m0, tmp_path / "q")
    m = manifest(path)
    for rec in m["layers"].values():
        rec.pop("activations", None)
    write_manifest(path, m)
    with pytest.raises(ValueError, match="the manifest was edited"):  # the tensor file's own copy of the records
        mp.load(path, make())
    h, body = header((path / "model.safetensors").read_bytes())
    del h["__metadata__"]["modelpress"]  # as a file saved before the records were kept in it
    write_tensors(path, with_header(h, body))
    assert same_model(mp.load(path, make()), m0)
    assert "a:" not in str(mp.inspect_saved(path))
