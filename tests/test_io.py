"""save / load / dequantize: bit-exact round trips for every format and layer type, tied weights, Hugging Face
folders, and bad input that fails with a clear error while leaving the user's files (and model) untouched."""
import copy
import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import modelpress as mp
import modelpress.io as mpio
import modelpress.io.writer as mpwriter
import modelpress.io.manifest as mpmanifest
from modelpress import QuantConfig, quantize_, set_kernels
from modelpress.quant import QuantMixin, kernels

WEIGHT_FORMATS = ["int8", "int8:tensor", "int4:g32", "int4:g128:asym", "int3:g32", "int2:g16", "int1:g32",
                  "ternary:g32", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "mxfp8", "mxfp6",
                  "mxfp4", "mxint8", "nvfp4"]
QUANT_TYPES = {"emb": mp.QuantEmbedding, "bag": mp.QuantEmbeddingBag, "fc": mp.QuantLinear,
               "conv1": mp.QuantConv1d, "conv2": mp.QuantConv2d, "dw": mp.QuantConv2d}


class AllLayers(nn.Module):
    """Linear, Conv1d, Conv2d (grouped and depthwise), Embedding, EmbeddingBag, and a float LayerNorm."""

    def __init__(self, fc_out=48, norm=48):
        super().__init__()
        self.emb = nn.Embedding(40, 64)
        self.bag = nn.EmbeddingBag(40, 64, mode="sum")
        self.fc = nn.Linear(128, fc_out)  # K = 128, N = 48: the int4 (g32, g128) and int8 CPU kernels apply
        self.conv1 = nn.Conv1d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.norm = nn.LayerNorm(norm)

    def forward(self, idx, seq, img):  # idx [B, 6], seq [B, 3, 10], img [B, 4, 5, 5]
        e = torch.cat([self.emb(idx).mean(1), self.bag(idx)], 1)  # [B, 128]
        h = self.norm(self.fc(e))  # [B, 48]
        return torch.cat([h, self.conv1(seq).flatten(1), self.dw(self.conv2(img)).flatten(1)], 1)


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return AllLayers(**kw).eval()


def batch(b=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 40, (b, 6), generator=g), torch.randn(b, 3, 10, generator=g),
            torch.randn(b, 4, 5, 5, generator=g))


def outputs(model, kernels_on):
    set_kernels(model, kernels_on)
    with torch.no_grad():
        out = [model(*batch(5)), model(*batch(1, seed=2))]
    set_kernels(model, True)
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_model(a, b):
    assert {n: type(m) for n, m in a.named_modules()} == {n: type(m) for n, m in b.named_modules()}
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    for kernels_on in (True, False):
        for x, y in zip(outputs(a, kernels_on), outputs(b, kernels_on)):
            assert torch.equal(x, y)


def quantized(weights="int8", activations=None, seed=0, **kw):
    """AllLayers quantized; min/max weight ranges (the MSE search changes codes, not how they are stored)."""
    m = make(seed)
    calib = [batch(4, seed=s) for s in range(3)] if activations and "static" in activations else None
    kw.setdefault("weight_observer", "minmax")
    quantize_(m, QuantConfig(weights=weights, activations=activations, **kw), calib=calib)
    return m


@pytest.mark.parametrize("fmt", WEIGHT_FORMATS)
def test_round_trip_every_weight_format_and_layer_type(fmt, tmp_path):
    m = quantized(fmt)
    for name, cls in QUANT_TYPES.items():
        assert type(getattr(m, name)) is cls and str(getattr(m, name).weight_format) == str(mp.parse_format(fmt))
    mp.save(m, tmp_path / "q")
    assert sorted(os.listdir(tmp_path / "q")) == ["model.safetensors", "modelpress.json"]  # no .pt / .bin
    loaded = mp.load(tmp_path / "q", make(seed=123))  # other float weights: everything must come from the file
    assert_same_model(m, loaded)
    assert not loaded.training
    manifest = json.loads((tmp_path / "q" / "modelpress.json").read_text())
    assert manifest["layers"]["fc"] == {"type": "QuantLinear", "weights": str(mp.parse_format(fmt)),
                                        "activations": None, "shape": [48, 128]}
    assert set(manifest["layers"]) == set(QUANT_TYPES)


@pytest.mark.parametrize("fmt, kernel", [("int8", "int8pack"), ("int4:g32", "int4pack"),
                                         ("int4:g128:asym", "int4pack")])
def test_kernel_path_really_used_after_load(fmt, kernel, tmp_path):
    mp.save(quantized(fmt), tmp_path / "q")
    loaded = mp.load(tmp_path / "q", make(seed=5))
    path = kernels.select(loaded.fc, torch.zeros(5, 128))
    assert path in ("native", kernel)  # the native kernels when they are built, torch's otherwise
    with torch.no_grad():
        loaded(*batch())
    assert path in loaded.fc._kernel_cache


@pytest.mark.parametrize("act", ["int8", "int8:static", "fp8_e4m3"])
def test_round_trip_activation_formats(act, tmp_path):
    m = quantized("int8", act)
    mp.save(m, tmp_path / "q")
    loaded = mp.load(tmp_path / "q", make(seed=9))
    assert str(loaded.fc.act) == act and str(loaded.conv2.act) == act and loaded.emb.act is None
    if act == "int8:static":
        assert loaded.fc.input_scale.item() == m.fc.input_scale.item() != 1.0
        assert kernels.select(loaded.fc, torch.zeros(5, 128)) in ("native", "int_mm")
    assert_same_model(m, loaded)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 32)
        self.mid = nn.Linear(32, 32)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.mid(self.emb(idx))))


@pytest.mark.parametrize("exclude", [[], ["head"], ["head", "emb"]])
def test_tied_weights(exclude, tmp_path):
    torch.manual_seed(0)
    m = Tied().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_(m, QuantConfig(weights="int4:g32", exclude=exclude))
    mp.save(m, tmp_path / "q")
    stored = load_file(str(tmp_path / "q" / "model.safetensors"))
    manifest = json.loads((tmp_path / "q" / "modelpress.json").read_text())
    if exclude:  # a tied user stays float, so the other one does too (else: float weight + a quantized copy)
        assert type(m.emb) is nn.Embedding and m.head.weight is m.emb.weight
        assert manifest["aliases"] == {"head.weight": "emb.weight"} and "head.weight" not in stored
        assert exclude == ["head", "emb"] or "emb (its weight is tied to head" in str(caught[0].message)
    else:  # both quantized once: the same packed buffers, stored once
        assert type(m.emb) is mp.QuantEmbedding and type(m.head) is mp.QuantLinear
        assert m.head.weight_codes is m.emb.weight_codes and m.head.weight_scale is m.emb.weight_scale
        assert manifest["aliases"] == {"head.weight_codes": "emb.weight_codes", "head.weight_scale": "emb.weight_scale"}
        assert not caught
    torch.manual_seed(1)
    fresh = Tied().eval()
    loaded = mp.load(tmp_path / "q", fresh)
    if exclude:
        assert loaded.head.weight is loaded.emb.weight
    else:  # sharing restored on load
        assert loaded.head.weight_codes is loaded.emb.weight_codes
    idx = torch.randint(0, 64, (3, 7))
    with torch.no_grad():
        assert torch.equal(loaded(idx), m(idx))
    assert mp.inspect(m).total_bytes == mp.inspect_saved(tmp_path / "q").total_bytes == \
        sum(t.numel() * t.element_size() for t in stored.values())


def test_hugging_face_folder(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    q = copy.deepcopy(hf)
    quantize_(q, QuantConfig(weights="int4:g32", overrides={"lm_head": "int8"}, weight_observer="minmax"))
    assert type(q.lm_head) is mp.QuantLinear and type(q.model.embed_tokens) is mp.QuantEmbedding
    mp.save(q, tmp_path / "q")
    before = snapshot(tmp_path / "hf")
    loaded = mp.load(tmp_path / "q", tmp_path / "hf")
    assert snapshot(tmp_path / "hf") == before
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = q(ids, use_cache=False).logits, loaded(ids, use_cache=False).logits
        f = hf(ids, use_cache=False).logits
    assert torch.equal(a, b)
    assert F.cosine_similarity(a.flatten(), f.flatten(), dim=0) > 0.98
    with pytest.raises(ValueError, match="config.json"):
        mp.load(tmp_path / "q", tmp_path)


# ---- bad input: clear errors, files untouched ------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    m = quantized("int4:g32", exclude=["emb"])
    path = mp.save(m, tmp_path / "q")
    return m, path


def test_save_refuses_non_empty_folder(saved, tmp_path):
    m, path = saved
    before = snapshot(path)
    with pytest.raises(FileExistsError, match="not empty.*overwrite=True"):
        mp.save(quantized("int8"), path)
    assert snapshot(path) == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        mp.save(m, tmp_path / "other")
    assert snapshot(tmp_path / "other") == {"notes.txt": b"mine"}
    assert sorted(os.listdir(tmp_path)) == ["other", "q"]  # no temp folder left


def test_save_into_empty_folder_and_refuses_a_file(tmp_path):
    (tmp_path / "empty").mkdir()
    mp.save(quantized(), tmp_path / "empty")
    assert sorted(os.listdir(tmp_path / "empty")) == ["model.safetensors", "modelpress.json"]
    (tmp_path / "f").write_bytes(b"data")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="is a file"):
            mp.save(quantized(), tmp_path / "f", overwrite=overwrite)
    assert (tmp_path / "f").read_bytes() == b"data"


def test_overwrite_replaces_atomically(saved, tmp_path):
    _, path = saved
    (path / "junk.txt").write_text("old")
    m2 = quantized("nvfp4", seed=3)
    mp.save(m2, path, overwrite=True)
    assert sorted(os.listdir(path)) == ["model.safetensors", "modelpress.json"]
    assert os.listdir(tmp_path) == ["q"]  # no .tmp / .old folder left in the parent
    assert_same_model(m2, mp.load(path, make(seed=4)))


def test_failed_save_leaves_nothing(monkeypatch, saved, tmp_path):
    _, path = saved
    before = snapshot(path)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(mpwriter, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        mp.save(quantized(), tmp_path / "new")
    assert os.listdir(tmp_path) == ["q"]  # neither the final name nor a temp folder
    with pytest.raises(OSError, match="disk full"):
        mp.save(quantized(), path, overwrite=True)
    assert os.listdir(tmp_path) == ["q"] and snapshot(path) == before  # the old save survives intact


def test_truncated_tensor_file(saved):
    _, path = saved
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    before = snapshot(path)
    with pytest.raises(ValueError, match="truncated"):
        mp.load(path, make())
    assert snapshot(path) == before


def test_corrupted_byte_fails_checksum(saved):
    _, path = saved
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    model = make()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="checksum"):
        mp.load(path, model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(x, QuantMixin) for x in model.modules())


def test_unreadable_safetensors_with_matching_checksum(saved):
    _, path = saved
    f = path / "model.safetensors"
    f.write_bytes(b"\xff" * f.stat().st_size)
    mf = path / "modelpress.json"
    manifest = json.loads(mf.read_text())
    manifest["tensors"]["sha256"] = mpmanifest._sha256(f)
    mf.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        mp.load(path, make())


@pytest.mark.parametrize("content, match", [
    (None, "modelpress.json is missing"),
    ("{not json", "corrupt"),
    ("[1, 2]", "not a modelpress manifest"),
    ('{"format": "other"}', "not a modelpress manifest"),
])
def test_missing_or_corrupt_manifest(saved, content, match):
    _, path = saved
    mf = path / "modelpress.json"
    if content is None:
        mf.unlink()
    else:
        mf.write_text(content)
    before = snapshot(path)
    with pytest.raises(ValueError, match=match):
        mp.load(path, make())
    with pytest.raises(ValueError, match=match):
        mp.inspect_saved(path)
    assert snapshot(path) == before


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mp.load(tmp_path / "nope", make())


def test_a_file_or_an_empty_path_is_not_a_folder(saved):
    _, path = saved
    with pytest.raises(ValueError, match="modelpress.json is a file; give its folder"):
        mp.inspect_saved(path / "modelpress.json")
    with pytest.raises(ValueError, match="model.safetensors is a file; give the folder it was saved in"):
        mp.load(path / "model.safetensors", make())
    with pytest.raises(ValueError, match="no folder given"):
        mp.inspect_saved("")


def test_newer_format_version(saved):
    _, path = saved
    mf = path / "modelpress.json"
    manifest = json.loads(mf.read_text())
    assert manifest["format_version"] == mpio.FORMAT_VERSION == 1
    manifest["format_version"] = 2
    mf.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format version 2.*upgrade modelpress"):
        mp.load(path, make())


class NoFc(nn.Module):
    def __init__(self):
        super().__init__()
        src = make()
        self.emb, self.bag, self.conv1, self.conv2, self.dw = src.emb, src.bag, src.conv1, src.conv2, src.dw
        self.norm = src.norm


class FcIsConv(AllLayers):
    def __init__(self):
        super().__init__()
        self.fc = nn.Conv1d(128, 48, 1)


@pytest.mark.parametrize("build, match", [
    (NoFc, r"no layer 'fc'.*wrong architecture"),
    (FcIsConv, r"layer 'fc' is Conv1d in the model but QuantLinear in the file"),
    (lambda: make(fc_out=32, norm=32), r"layer 'fc' has weight shape \[32, 128\], the file has \[48, 128\]"),
    (lambda: make(norm=50), r"tensor 'norm.weight': the model expects torch.float32 \(50,\)"),
])
def test_wrong_architecture_or_shape(saved, build, match):
    _, path = saved
    before = snapshot(path)
    model = build().eval()
    types = {n: type(m) for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        mp.load(path, model)
    assert snapshot(path) == before
    assert {n: type(m) for n, m in model.named_modules()} == types  # a failed load leaves the model as it was
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_extra_float_layer_is_reported(saved):
    _, path = saved
    model = make()
    model.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"missing \['extra.bias', 'extra.weight'\]"):
        mp.load(path, model)


def test_loading_never_unpickles(monkeypatch, saved):
    m, path = saved

    def no(*a, **k):
        raise AssertionError("unpickling during load")

    monkeypatch.setattr(torch, "load", no)
    monkeypatch.setattr(pickle, "load", no)
    monkeypatch.setattr(pickle, "loads", no)
    monkeypatch.setattr(pickle, "Unpickler", no)
    assert not [p for p in os.listdir(path) if p.endswith((".pt", ".pth", ".bin", ".pkl"))]
    assert_same_model(m, mp.load(path, make(seed=2)))


def test_metadata_is_stored(tmp_path):
    mp.save(quantized(), tmp_path / "q", metadata={"source": "unit", "n": 3})
    manifest = mpio.read_manifest(tmp_path / "q")
    assert manifest["metadata"] == {"source": "unit", "n": 3} and manifest["model_class"] == "AllLayers"


# ---- dequantize -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["int8", "int4:g32:asym", "int2:g16", "fp6_e2m3", "mxfp4", "nvfp4"])
def test_dequantize(fmt, tmp_path):
    m = quantized(fmt)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    ref = outputs(m, kernels_on=False)
    plain = mp.dequantize(m)
    assert not any(isinstance(x, QuantMixin) for x in plain.modules())
    assert {n: type(x) for n, x in plain.named_modules()} == {n: type(x) for n, x in make().named_modules()}
    for a, b in zip(outputs(plain, True), ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # the original is unchanged
    assert all(isinstance(getattr(m, n), c) for n, c in QUANT_TYPES.items())
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    assert torch.equal(plain.fc.weight, m.fc.dequantized_weight())
    assert (plain.conv2.groups, plain.dw.groups, plain.bag.mode) == (2, 8, "sum")
    # save_dequantized: a fresh float model loads it strictly and computes the same
    f = mp.save_dequantized(m, tmp_path / "plain.safetensors")
    fresh = make(seed=77)
    fresh.load_state_dict(load_file(str(f)), strict=True)
    for a, b in zip(outputs(fresh, True), outputs(plain, True)):
        assert torch.equal(a, b)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        mp.save_dequantized(m, f)
    mp.save_dequantized(m, f, overwrite=True)
    assert os.listdir(tmp_path) == ["plain.safetensors"]


def test_dequantize_inplace_and_tied():
    m = quantized("int8")
    with torch.no_grad():
        m(*batch())  # builds kernel caches, which must not stop a deep copy
    plain = mp.dequantize(m)
    assert plain is not m and isinstance(m.fc, mp.QuantLinear)
    same = mp.dequantize(m, inplace=True)
    assert same is m and type(m.fc) is nn.Linear
    torch.manual_seed(0)
    t = Tied().eval()
    quantize_(t, QuantConfig(weights="int8", exclude=["head", "emb"]))
    d = mp.dequantize(t)
    assert d.head.weight is d.emb.weight and type(d.mid) is nn.Linear
