"""The speed guard: a quantized layer runs the fastest of its correct paths, measured against its float layer.

The first time a layer sees a number of rows (M, rounded up to a power of two: the "bucket"), each candidate path
and the float layer (a dense fp32 weight of the same shape) are timed on random inputs (an embedding table in speed
mode: on the call's own ids) of that call's rows below 16, of the bucket's bound from 16 on, in interleaved rounds,
and the fastest path wins. A layer is timed as its weights reach it in its model (kernels/__init__.py: `_decide`,
`note_model`): with cold caches when the layer is large or its model's weights exceed the L2, hot when the whole
model fits the L2. A path that wins with its weights in cache can lose when they stream, and the other way. The
result is stored in a JSON file under the kernel cache folder,
keyed by the CPU (model and instruction set used), torch version, kernel sources, threads, layer shape, formats and
bucket, so the next process (or the next layer of the same shape) pays nothing.

Modes (`set_kernels(model, mode=...)`):
- "memory" (default): only paths that read the packed weights; the winner may still be slower than float (the
  report then says so).
- "speed": as "memory", but unless a packed path beats it by SPEED_MARGIN (10 %), a dense copy of the weight is
  cached beside the codes and used instead: fp32 (4 bytes per weight), or bf16 (2 bytes per weight, bf16 input) on
  CPUs that multiply bf16 in hardware, whichever is faster.

`MODELPRESS_TUNE=0` turns timing off: decisions then follow fixed rules (paths.STATIC_ORDER), deterministic and
instant (the test suite runs this way). Nothing here asserts speed; it only measures and chooses.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import build

TUNE_ENV = "MODELPRESS_TUNE"
CACHE_VERSION = 8  # 2: repetitions sized on a second call (the first one builds kernel state); 3: allocator settled;
# 4: fp32 tiles of 4 MB (a Python-side change the source hash of the native build does not see); 5: untimed calls
# before each sample, samples of 1 ms; 6: allocator settled for the output's size too; 7: large activations timed
# with only the input in cache (and the narrow products in blocks of rows: earlier choices were made without them);
# 8: layers of models whose weights exceed the L2 timed cold, calls under 16 rows at their own rows, speed mode's
# margin for packed paths


def tuning_enabled() -> bool:
    return os.environ.get(TUNE_ENV, "1").strip() not in ("0", "off", "false", "no")


def bucket(m: int) -> int:
    """Rows are timed and cached per power-of-two bucket: 1, 2, 4, 8, ... (the bucket is its upper bound)."""
    return 1 if m <= 1 else 1 << (int(m) - 1).bit_length()


@dataclass(frozen=True)
class Choice:
    path: str  # a path name; "reference" is the dequantize-then-compute path
    rows: int  # the bucket it was decided for (rows M; batch size for convolutions)
    speedup: float | None = None  # float layer time / chosen path time at `rows` (None: not measured)
    source: str = "static"  # "static" (rules) | "measured" | "cached" (measured by an earlier process)
    times_ms: dict = field(default_factory=dict)  # every timed path and "float", ms per call
    timed: str = ""  # how the paths were timed: "hot" (call after call), "cold" (weights flushed before each call),
    # "input only" (every cache cleared but for the input); "" where nothing was timed


class TuneCache:
    """A JSON file of measured choices. Writes are atomic (temp file + rename) under an exclusive file lock, and
    merge with what other processes wrote meanwhile; a corrupt or foreign file is ignored and replaced."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._entries: dict | None = None

    @classmethod
    def for_cpu(cls, cpu) -> "TuneCache":
        name = f"tune-{cpu.key}-torch{torch.__version__}-{build.source_hash()[:8]}.json"
        return cls(build.cache_root() / name)

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
            if isinstance(data, dict) and data.get("version") == CACHE_VERSION and isinstance(data.get("entries"), dict):
                return data["entries"]
        except (OSError, ValueError):
            pass
        return {}

    def get(self, key: str) -> dict | None:
        if self._entries is None:
            self._entries = self._read()
        return self._entries.get(key)

    def put(self, key: str, value: dict, meta: dict | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with build._file_lock(self.path.with_suffix(".lock")):
            entries = self._read()
            entries[key] = value
            data = {"version": CACHE_VERSION, **(meta or {}), "entries": entries}
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        self._entries = entries


def time_calls(fns: dict[str, Callable[[], object]], rounds: int = 5, min_sample_s: float = 1e-3,
               before: Callable[[str], None] | None = None) -> dict[str, float]:
    """Seconds per call of each function: one warm-up call each (it may build kernel state, so it is not timed),
    a second call sizes the repetitions, then `rounds` interleaved rounds (A, B, A, B ...); short calls repeat
    within a sample. Each sample follows as many untimed calls of the same function: otherwise a short call pays
    for the caches the previous path left (after a 6 ms path, a 0.22 ms depthwise convolution took 0.3-0.4 ms, then
    0.25, and ran at its own speed only from its third call on), which a model, where the layer's input was just
    written, does not. The fastest round counts: background load (other processes, a preempted
    thread) only ever adds time, so the minimum is the steadiest estimate of what a path costs on its own. With
    one torch thread the clock is the thread's CPU time, which preemption by other processes does not advance.
    `before(name)`, when given, runs (untimed) before each sample: the guard evicts a large layer's weights from the
    caches there, so that paths are compared as they run in a model whose weights stream from memory; a sample is
    then one call (the eviction holds for that call only)."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    reps = {}
    for name, fn in fns.items():
        fn()
        t0 = clock()
        fn()
        dt = clock() - t0
        reps[name] = 1 if before is not None else max(1, min(1000, int(min_sample_s / max(dt, 1e-7))))
    samples: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(reps[name]):
                fn()
            if before is not None:
                before(name)
            t0 = clock()
            for _ in range(reps[name]):
                fn()
            samples[name].append((clock() - t0) / reps[name])
    return {n: min(v) for n, v in samples.items()}


DENSE = ("dense", "dense-bf16", "dense-cl")


# Speed mode keeps a packed path over the dense copy only when it measured at least this much faster. Timed alone,
# packed paths promise more than they give inside a model on near-ties: shakespeare-lm's 256 x 256 and 768 x 256
# layers over 128 tokens, 4-bit, measured 1.07-1.12x float cold and ran 0.95-1.05x in the model (Intel Xeon,
# AVX-512), and speed mode then ran the model at 0.99x float.
SPEED_MARGIN = 1.1


def pick(times: dict[str, float], mode: str) -> str:
    """The fastest packed path; in "speed" mode the fastest dense copy instead unless a packed path beats it by
    SPEED_MARGIN."""
    packed = {n: t for n, t in times.items() if n != "float" and n not in DENSE}
    best = min(packed, key=packed.get)
    dense = {n: t for n, t in times.items() if n in DENSE}
    if mode == "speed" and dense:
        d = min(dense, key=dense.get)
        if packed[best] * SPEED_MARGIN > dense[d]:
            return d
    return best


def measure(key: str, rows: int, fns: dict[str, Callable[[], object]], float_fn: Callable[[], object], mode: str,
            cache: TuneCache | None, meta: dict | None = None, before: Callable[[str], None] | None = None,
            timed: str = "") -> Choice:
    """Choose among `fns` (path name -> one call at `rows` rows) against `float_fn`; cached under `key` (which
    names the timing condition `timed`, so a cached entry was timed the same way)."""
    hit = cache.get(key) if cache is not None else None
    if hit and hit.get("path") in fns:
        return Choice(hit["path"], rows, hit.get("speedup"), "cached", hit.get("times_ms", {}), timed)
    with torch.no_grad():  # not inference_mode: kernel states built here are used later outside it
        # one call per sample when caches are evicted before each: more rounds for the same confidence
        times = time_calls({"float": float_fn, **fns}, rounds=5 if before is None else 9, before=before)
    path = pick(times, mode)
    speedup = times["float"] / times[path] if times[path] > 0 else None
    choice = Choice(path, rows, speedup, "measured", {n: round(t * 1e3, 5) for n, t in times.items()}, timed)
    if cache is not None:
        try:
            cache.put(key, {k: v for k, v in asdict(choice).items() if k in ("path", "speedup", "times_ms")}, meta)
        except OSError:  # a read-only cache folder costs a re-measurement next time, nothing else
            pass
    return choice
