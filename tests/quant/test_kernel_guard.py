"""The speed guard: choices from timings (a fake clock here: tests never assert speed), modes, the disk cache."""
import json

import pytest
import torch
from torch import nn

from modelpress.quant import QuantConv2d, QuantLinear, kernel_mode, kernels, set_kernels
from modelpress.quant.kernels import build, guard


@pytest.fixture
def tuned(monkeypatch, tmp_path):
    """Timing on, a private cache folder, and a fake clock: `times[path]` seconds per call ("float" included)."""
    build.load()  # the native build stays where it is (built once per machine)
    monkeypatch.setenv("MODELPRESS_TUNE", "1")
    monkeypatch.setenv("MODELPRESS_CACHE", str(tmp_path))
    times = {}
    calls = []

    def fake(fns, rounds=5, min_sample_s=3e-4, before=None):
        calls.append(sorted(fns))
        for fn in fns.values():  # every candidate still runs once: a broken path would raise here
            fn()
        return {n: times.get(n, 9.0) for n in fns}  # paths a test does not name are slow

    monkeypatch.setattr(guard, "time_calls", fake)
    return times, calls, tmp_path


def layer(fmt="int8", act=None, seed=0):
    torch.manual_seed(seed)
    return QuantLinear.from_float(nn.Linear(64, 32), fmt, act)


def test_bucket():
    assert [guard.bucket(m) for m in (0, 1, 2, 3, 4, 5, 8, 9, 100, 256, 257)] == [1, 1, 2, 4, 4, 8, 8, 16, 128, 256, 512]


def test_memory_mode_picks_the_fastest_packed_path(tuned):
    times, calls, _ = tuned
    q = layer()
    times.update({"float": 1.0, "native": 0.5, "int8pack": 0.4, "reference": 3.0})
    with torch.no_grad():
        q(torch.randn(3, 64))
    (row,) = kernels.describe(q)
    assert row["path"] == "int8pack" and row["rows"] == 4 and row["source"] == "measured"
    assert row["speedup"] == pytest.approx(2.5)
    assert "float" in calls[0] and "reference" in calls[0] and "dense" not in calls[0]
    times.update({"native": 2.0, "int8pack": 2.5})  # all packed paths slower than float: memory mode keeps one
    with torch.no_grad():
        q(torch.randn(20, 64))
    assert [r["path"] for r in kernels.describe(q)][1].startswith("native")
    assert kernels.describe(q)[1]["speedup"] == pytest.approx(0.5)


def test_speed_mode_takes_a_dense_copy_only_when_packed_paths_lose(tuned):
    times, _, _ = tuned
    q = layer()
    set_kernels(q, mode="speed")
    assert kernel_mode(q) == "speed"
    times.update({"float": 1.0, "native": 0.5, "int8pack": 0.6, "dense": 1.0, "reference": 3.0})
    x = torch.randn(2, 64)
    with torch.no_grad():
        q(x)
    assert kernels.describe(q)[0]["path"].startswith("native") and "dense" not in q._kernel_cache
    times.update({"native": 1.5, "int8pack": 1.6, "dense": 1.05})
    with torch.no_grad():
        y = q(torch.randn(64, 64))
    row = kernels.describe(q)[1]
    assert row["path"] == "dense" and row["extra_bytes"] == 4 * 64 * 32 and "dense" in q._kernel_cache
    assert y.shape == (64, 32)
    with torch.no_grad():
        assert torch.equal(q(x.repeat(32, 1)), q.reference(x.repeat(32, 1)))  # dense == reference exactly
    set_kernels(q, mode="memory")  # back to packed weights only: the dense copy is dropped
    assert q._kernel_plan == {} and "dense" not in q._kernel_cache


def test_speed_mode_keeps_a_packed_path_only_when_clearly_faster():
    """Speed mode: the dense copy unless a packed path beats it by SPEED_MARGIN (isolated timings flatter packed
    paths on near-ties); memory mode: the fastest packed path whatever float does."""
    near = {"float": 1.0, "native": 0.95, "int8pack": 1.2, "dense": 1.0}
    clear = {**near, "native": 0.85}
    assert guard.SPEED_MARGIN == pytest.approx(1.1)
    assert guard.pick(near, "speed") == "dense" and guard.pick(clear, "speed") == "native"
    assert guard.pick(near, "memory") == "native" and guard.pick({**near, "native": 1.5}, "memory") == "int8pack"
    assert guard.pick({"float": 1.0, "native": 0.5, "dense": 1.3, "dense-bf16": 0.52}, "speed") == "dense-bf16"


def test_choices_are_cached_on_disk_and_reused(tuned):
    times, calls, tmp = tuned
    times.update({"float": 1.0, "native": 0.3, "int8pack": 0.6})
    with torch.no_grad():
        layer(seed=0)(torch.randn(1, 64))
    files = list((tmp / "kernels").glob("tune-*.json"))
    assert len(files) == 1 and not list((tmp / "kernels").glob(".tune-*"))  # written atomically
    data = json.loads(files[0].read_text())
    assert data["version"] == guard.CACHE_VERSION and data["torch"] == torch.__version__
    (entry,) = data["entries"].values()
    assert entry["path"] == "native" and entry["times_ms"]["float"] == 1000.0
    n = len(calls)
    q2 = layer(seed=1)  # another layer of the same shape and format, as in a new process: no timing
    with torch.no_grad():
        q2(torch.randn(1, 64))
    assert len(calls) == n and kernels.describe(q2)[0]["source"] == "cached"


def test_corrupt_cache_file_is_replaced(tuned):
    times, _, tmp = tuned
    times.update({"float": 1.0, "int8pack": 0.5, "native": 0.7})
    q = layer()
    cache = guard.TuneCache.for_cpu(kernels.cpu_info())
    cache.path.parent.mkdir(parents=True, exist_ok=True)
    cache.path.write_text("{not json")
    with torch.no_grad():
        q(torch.randn(1, 64))
    assert kernels.describe(q)[0]["path"] == "int8pack"
    assert json.loads(cache.path.read_text())["entries"]


def test_conv_layers_are_guarded_too(tuned):
    times, _, _ = tuned
    times.update({"float": 1.0, "native": 2.0, "reference": 1.5})
    torch.manual_seed(0)
    q = QuantConv2d.from_float(nn.Conv2d(8, 16, 3, padding=1), "int8", "int8")
    with torch.no_grad():
        q(torch.randn(2, 8, 6, 6))
    (row,) = kernels.describe(q)
    assert row["path"] == "reference" and row["input"] == [8, 6, 6] and row["speedup"] == pytest.approx(1 / 1.5, abs=1e-3)


def test_real_timing_runs_and_chooses_a_correct_path(monkeypatch, tmp_path):
    """With the real clock (no assertion on which path wins): a choice is made, cached, and is correct."""
    build.load()
    monkeypatch.setenv("MODELPRESS_TUNE", "1")
    monkeypatch.setenv("MODELPRESS_CACHE", str(tmp_path))
    q = layer("int8", "int8")
    x = torch.randn(5, 64)
    with torch.no_grad():
        y = q(x)
        ref = q.reference(x)
    row = kernels.describe(q)[0]
    assert row["source"] == "measured" and row["speedup"] > 0
    assert ((y - ref).norm() / ref.norm()).item() <= 2e-6
    chosen = {c.path for c in q._kernel_plan.values()}  # (whichever wins here: a slow build may pick native-decode)
    assert len(chosen) == 1 and set(q._kernel_cache) <= chosen  # only the chosen path's state is kept


def test_static_rules_without_timing(monkeypatch):
    monkeypatch.setenv("MODELPRESS_TUNE", "0")
    q = layer("mxfp8")  # a format no matrix kernel reads: native decode, or the dense copy in speed mode
    with torch.no_grad():
        q(torch.randn(2, 64))
    exact = "native decode" if build.load() is not None else "reference"
    assert kernels.describe(q)[0]["path"] == exact and kernels.describe(q)[0]["source"] == "static"
    assert kernels.describe(q)[0]["timed"] == ""  # nothing timed
    set_kernels(q, mode="speed")
    with torch.no_grad():
        q(torch.randn(2, 64))
    assert kernels.describe(q)[0]["path"] == "dense"


def test_bad_mode():
    with pytest.raises(ValueError, match="kernel mode 'fast'"):
        set_kernels(layer(), mode="fast")


def test_time_calls_does_not_size_repetitions_on_the_first_call(monkeypatch):
    """A path's first call may build its kernel state (a dense copy, a packed layout): it is a warm-up, not the
    sample that decides how often a short call repeats. Fake clock: the first call costs 1 s, later ones 1 us."""
    now = [0.0]
    monkeypatch.setattr(guard.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(guard.time, "thread_time", lambda: now[0])
    counts = {"slow-first": 0}

    def slow_first():
        now[0] += 1.0 if counts["slow-first"] == 0 else 1e-6
        counts["slow-first"] += 1

    times = guard.time_calls({"slow-first": slow_first}, rounds=3, min_sample_s=3e-4)
    assert times["slow-first"] == pytest.approx(1e-6)
    assert counts["slow-first"] == 2 + 3 * 2 * 300  # warm-up, sizing call, then per round 300 untimed + 300 timed


def test_time_calls_with_an_eviction_times_one_call_per_sample(monkeypatch):
    """With `before` (the cache eviction of large layers), each sample is one call right after it: the eviction
    holds for that call only. Each sample still follows as many untimed calls."""
    now = [0.0]
    monkeypatch.setattr(guard.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(guard.time, "thread_time", lambda: now[0])
    log = []

    def fn():
        now[0] += 1e-6
        log.append("call")

    times = guard.time_calls({"p": fn}, rounds=3, min_sample_s=3e-4, before=lambda name: log.append("evict"))
    assert times["p"] == pytest.approx(1e-6)
    assert log == ["call", "call"] + ["call", "evict", "call"] * 3  # warm-up, sizing, then per round


def _record_eviction(monkeypatch, tmp_path) -> dict:
    """Timing on, the cache in tmp_path, and a fake `time_calls` that records the `before` hook the guard passes
    and runs it once per path (it must work for every path: flushing every tensor the path holds, or clearing the
    caches around the input); every path times the same."""
    monkeypatch.setenv("MODELPRESS_TUNE", "1")
    monkeypatch.setenv("MODELPRESS_CACHE", str(tmp_path))
    seen = {}

    def fake(fns, rounds=5, min_sample_s=3e-4, before=None):
        seen["before"] = before
        for name, fn in fns.items():
            fn()
            if before is not None:
                before(name)
        return {n: 1.0 for n in fns}

    monkeypatch.setattr(guard, "time_calls", fake)
    return seen


def test_large_layers_are_timed_with_cold_caches(monkeypatch, tmp_path):
    """A layer whose fp32 weight is at least COLD_BYTES is timed with its weights and each path's state evicted
    before every sample (a model of such layers streams them from memory); small layers are timed warm."""
    if build.load() is None:
        pytest.skip("no native build (the eviction uses it)")
    seen = _record_eviction(monkeypatch, tmp_path)
    small = QuantLinear.from_float(nn.Linear(64, 32), "int4:g32")
    small(torch.randn(2, 64))
    assert seen["before"] is None
    side = 1024  # 1024 x 1024 fp32 = 4 MB
    assert side * side * 4 >= kernels.COLD_BYTES
    big = QuantLinear.from_float(nn.Linear(side, side), "int4:g32")
    y = big(torch.randn(2, side))
    assert seen["before"] is not None and torch.isfinite(y).all()


def test_large_activations_are_timed_with_only_the_input_in_cache(monkeypatch, tmp_path):
    """A small layer over many rows (input and output of at least WARM_INPUT_BYTES) is timed with the caches
    cleared of everything but its input before each sample: timed call after call, a path's scratch and output stay
    in cache, which in a model the layers in between evict. The choice is cached under its own key."""
    seen = _record_eviction(monkeypatch, tmp_path)
    layer = QuantLinear.from_float(nn.Linear(64, 32), "int8")
    layer(torch.randn(8, 64))  # 2 KB in, 1 KB out: timed warm
    assert seen["before"] is None
    rows = 4096  # 1 MB in, 0.5 MB out
    assert rows * (64 + 32) * 4 >= kernels.WARM_INPUT_BYTES
    x = torch.randn(rows, 64)
    y = layer(x)
    assert seen["before"] is not None
    torch.testing.assert_close(y, layer.reference(x), rtol=1e-3, atol=1e-3)
    keys = [k for f in tmp_path.rglob("tune-*.json") for k in json.loads(f.read_text())["entries"]]
    assert any(k.endswith("|warm-input") and "rows4096" in k for k in keys)
    assert [r["timed"] for r in kernels.describe(layer)] == ["hot", "input only"]


def test_large_table_lookups_are_timed_with_only_the_ids_in_cache(monkeypatch, tmp_path):
    """Speed mode's choice for a table (decoder or decoded copy) is timed with the caches cleared of everything but
    the ids when the lookup's output (or the table) is large: call after call, the float table and the outputs stay
    in cache, which in a model the layers in between evict. Few ids over a small table: timed warm."""
    from modelpress.quant import QuantEmbeddingBag

    if build.load() is None:
        pytest.skip("no native build (the decoder is native)")
    seen = _record_eviction(monkeypatch, tmp_path)
    q = QuantEmbeddingBag.from_float(nn.EmbeddingBag(1000, 16, mode="sum"), "int8")
    set_kernels(q, mode="speed")
    q(torch.randint(0, 1000, (8,)), torch.arange(8))  # 0.5 KB out, 64 KB of table
    assert seen["before"] is None
    n = 4096
    assert n * 16 * 4 >= kernels.WARM_INPUT_BYTES
    idx = torch.randint(0, 1000, (n,))
    y = q(idx, torch.arange(n))
    assert seen["before"] is not None
    assert torch.equal(y, torch.nn.functional.embedding_bag(idx, q.dequantized_weight(), torch.arange(n), mode="sum"))
    keys = [k for f in tmp_path.rglob("tune-*.json") for k in json.loads(f.read_text())["entries"]]
    assert any(k.startswith("table|") and k.endswith("|warm-input") and "ids4096" in k for k in keys)
    assert [r["timed"] for r in kernels.describe(q) if r["dtype"] == "ids"] == ["hot", "input only"]


@pytest.mark.parametrize("bag", [True, False], ids=["bag", "embedding"])
def test_speed_mode_tables_take_the_decoder_where_it_measured_faster(tuned, bag, monkeypatch):
    """Speed mode for embedding tables: the native decoder (memory mode's path) where it was timed faster than the
    decoded copy for that many ids, else the copy; both give the reference's numbers; inspect shows the choice per
    bucket of ids."""
    from modelpress.quant import QuantEmbedding, QuantEmbeddingBag

    if build.load() is None:
        pytest.skip("no native build (the decoder is native)")
    times, calls, _ = tuned
    torch.manual_seed(0)
    f = nn.EmbeddingBag(500, 16, mode="sum") if bag else nn.Embedding(500, 16)
    q = (QuantEmbeddingBag if bag else QuantEmbedding).from_float(f, "int4:g32")
    set_kernels(q, mode="speed")
    w = q.dequantized_weight()

    def call(n):
        idx = torch.randint(0, 500, (n,))
        y = q(idx, torch.arange(n)) if bag else q(idx)
        expect = torch.nn.functional.embedding_bag(idx, w, torch.arange(n), mode="sum") if bag else w[idx]
        assert torch.equal(y, expect)

    name = "table_bags" if bag else "table_rows"
    native_calls = []
    real = getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda *a: native_calls.append(1) or real(*a))
    times.update({"float": 1.0, "dense": 1.0, "native": 0.5})
    with torch.no_grad():
        call(3)
        before = len(native_calls)
        call(3)  # decided: the decoder answers
        assert len(native_calls) == before + 1
    times.update({"native": 2.0})
    with torch.no_grad():
        call(3000)
        before = len(native_calls)
        call(3000)  # decided: the copy answers
        assert len(native_calls) == before
        call(0)  # an empty lookup decides nothing
    rows = {r["rows"]: r for r in kernels.describe(q) if r["dtype"] == "ids"}
    assert rows[4]["path"] == "native decode (lookups)" and rows[4]["source"] == "measured"
    assert rows[4096]["path"] == "dense table" and set(rows) == {4, 4096}
    assert all(sorted(c) == ["dense", "float", "native"] for c in calls)


def _mlp(width=64, depth=8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(5000, width), *[nn.Linear(width, width) for _ in range(depth)])


def test_note_model_counts_the_weights_a_pass_reads(tmp_path):
    """Every layer's fp32 weight bytes (packed layers by their shape, biases included), embedding tables left out;
    noted on each quantized layer by quantize_ and load (set_kernels fills in layers that have none)."""
    import modelpress as mp

    model = _mlp()
    mp.quantize_(model, mp.QuantConfig(weights="int4:g32", include=["1", "2", "3"]))
    expected = 4 * 8 * (64 * 64 + 64)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 3 and all(m.model_weight_bytes == expected for m in layers)
    mp.save(model, tmp_path / "m")
    loaded = mp.load(tmp_path / "m", _mlp())
    assert [m.model_weight_bytes for m in loaded.modules() if isinstance(m, QuantLinear)] == [expected] * 3
    alone = QuantLinear.from_float(nn.Linear(64, 64), "int8")
    assert alone.model_weight_bytes is None
    set_kernels(alone, True)
    assert alone.model_weight_bytes == 4 * (64 * 64 + 64)


@pytest.mark.parametrize("l2, timed", [(1 << 20, None), (64 << 10, "cold")])
def test_small_layers_are_timed_as_their_model_streams_them(monkeypatch, tmp_path, l2, timed):
    """A small layer is timed with its weights evicted from the caches when its model's weights exceed the L2 (the
    other layers' weights pass through the caches between its calls); warm when the whole model fits the L2."""
    import modelpress as mp

    if timed and build.load() is None:
        pytest.skip("no native build (the eviction uses it)")
    seen = _record_eviction(monkeypatch, tmp_path)
    monkeypatch.setattr(kernels, "cache_bytes", lambda level: {2: l2}[level])
    model = _mlp()
    ids = torch.randint(0, 5000, (1, 3))
    want = model(ids)
    mp.quantize_(model, mp.QuantConfig(weights="int8"))
    assert 4 * 8 * (64 * 64 + 64) > 64 << 10  # 133 KB of weights
    y = model(ids)
    assert (seen["before"] is None) == (timed is None)
    torch.testing.assert_close(y, want, rtol=0.05, atol=0.05)
    keys = [k for f in tmp_path.rglob("tune-*.json") for k in json.loads(f.read_text())["entries"]]
    assert keys and all(k.endswith(f"|{timed}") if timed else not k.endswith(("|cold", "|warm-input")) for k in keys)
    assert all("|rows3|" in k for k in keys)  # timed at the call's own 3 rows (bucket 4)
    # inspect and the report say how each path was timed
    assert {r["timed"] for r in kernels.describe(model[1])} == {timed or "hot"}


def test_note_model_decides_again_only_when_the_total_changes():
    """A new total forgets the layer's decisions and kernel states (they were timed for another setting); the same
    total keeps them; set_kernels on a part of a model leaves a noted total alone; a tied weight counts once."""
    import modelpress as mp

    model = _mlp()
    mp.quantize_(model, mp.QuantConfig(weights="int8"))
    first = model[1]
    model(torch.randint(0, 5000, (1, 3)))
    assert first._kernel_plan and first._kernel_cache
    kernels.note_model(model)
    assert first._kernel_plan and first._kernel_cache  # unchanged total: kept
    before = first.model_weight_bytes
    set_kernels(model[1:3], True)
    assert first.model_weight_bytes == before and first._kernel_plan
    model.append(nn.Linear(64, 64))
    kernels.note_model(model)
    assert first.model_weight_bytes == before + 4 * (64 * 64 + 64)
    assert not first._kernel_plan and not first._kernel_cache

    tied = nn.Sequential(nn.Linear(32, 32, bias=False), nn.Linear(32, 32, bias=False))
    tied[1].weight = tied[0].weight
    kernels.note_model(tied)  # no quantized layer: nothing noted, nothing raised
    mp.quantize_(tied, mp.QuantConfig(weights="int8"))
    assert tied[0].model_weight_bytes == 4 * 32 * 32


def test_structural_transforms_note_the_new_total():
    """A transform that changes a quantized model's float layers (here a low-rank factorization) notes the new
    total on its quantized layers, so the guard decides again for the model as it now is."""
    import modelpress as mp

    model = _mlp()
    mp.quantize_(model, mp.QuantConfig(weights="int8", include=["1"]))
    before = model[1].model_weight_bytes
    assert before == 4 * 8 * (64 * 64 + 64)
    mp.factorize_(model, mp.FactorizeConfig(rank=8, include=["2", "3"]))
    low_rank = 2 * 4 * (8 * 64 + 64 * 8 + 64)  # two layers of two factors (rank 8) and a bias each
    assert model[1].model_weight_bytes == before - 2 * 4 * (64 * 64 + 64) + low_rank


def test_product_quantized_layers_count_the_weight_they_rebuild():
    """A product-quantized layer rebuilds its dense weight from the codebook at each pass: the total counts that
    weight as well as the codebook and bias it reads (the packed indices are not fp32 weights)."""
    import modelpress as mp

    model = _mlp()
    mp.quantize_(model, mp.QuantConfig(weights="int8", include=["1"]))
    before = model[1].model_weight_bytes
    mp.product_quantize_(model, mp.PQConfig(dim=4, entries=16, finetune_steps=0, include=["2"]),
                         calib=[torch.randint(0, 5000, (4, 3))])
    pq = 4 * (64 * 64 + 16 * 4 + 64)  # the rebuilt weight, the codebook [16, 4], the bias
    assert model[1].model_weight_bytes == before - 4 * (64 * 64 + 64) + pq


def test_sysfs_cache_sizes_are_parsed(tmp_path):
    from modelpress.quant.kernels import cpu

    for i, (level, kind, size) in enumerate([(1, "Data", "48K"), (1, "Instruction", "32K"), (2, "Unified", "2048K"),
                                             (3, "Unified", "32M")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    (tmp_path / "index9").mkdir()  # unreadable entries are skipped
    assert cpu.sysfs_cache_bytes(str(tmp_path), 1) == 48 << 10
    assert cpu.sysfs_cache_bytes(str(tmp_path), 2) == 2 << 20
    assert cpu.sysfs_cache_bytes(str(tmp_path), 3) == 32 << 20
    assert cpu.sysfs_cache_bytes(str(tmp_path), 4) == 0
    assert cpu.sysfs_cache_bytes(str(tmp_path / "missing"), 2) == 0
    assert cpu.cache_bytes(2) > 0
