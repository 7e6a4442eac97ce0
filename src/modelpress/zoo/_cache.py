"""Cache of trained zoo weights: safetensors plus a JSON manifest, atomic writes, rebuild on any doubt.

Layout: ``<cache_dir>/<name>/model.safetensors`` and ``<cache_dir>/<name>/meta.json``. The manifest is
written last and holds the config, the seed, a version and the SHA-256 of the weights file, so a torn,
truncated or corrupt file, or a file trained under another config, is never loaded: it is retrained.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

WEIGHTS, META = "model.safetensors", "meta.json"


@contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Inside the block torch's global RNG is seeded to `seed` and torch uses one CPU thread; the caller's
    RNG state and thread count come back afterwards. One thread makes a build repeat bit for bit on
    machines with different core counts, and keeps small models fast on busy shared cores."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def cached_model(
    folder: Path,
    meta: dict[str, Any],
    make: Callable[[], nn.Module],
    train: Callable[[nn.Module], None],
    rebuild: bool = False,
) -> nn.Module:
    """Return the trained model: loaded from `folder` when its manifest matches `meta`, else trained and saved.

    `make` must build a fresh, deterministically initialised model; `train` trains it in place.
    The returned model is in eval mode.
    """
    folder = Path(folder)
    meta = json.loads(json.dumps(meta))  # the form it takes after a round trip through the file
    if not rebuild:
        model = make()
        try:
            if _load_into(folder, meta, model):
                return model.eval()
        except Exception as exc:  # corrupt, truncated, wrong shapes: anything but a clean load
            warnings.warn(f"zoo cache {folder} is unreadable ({type(exc).__name__}: {exc}); rebuilding", stacklevel=3)
    model = make()
    train(model)
    model.eval()
    try:
        _save(folder, meta, model)
    except OSError as exc:  # a read-only or full cache must not cost the caller the model
        warnings.warn(f"could not write zoo cache {folder}: {exc}", stacklevel=3)
    return model


def _load_into(folder: Path, meta: dict[str, Any], model: nn.Module) -> bool:
    """Load the cached weights into `model`; False when there is no usable cache for `meta`."""
    meta_path, weights_path = folder / META, folder / WEIGHTS
    if not meta_path.exists() and not weights_path.exists():
        return False
    stored = json.loads(meta_path.read_text())
    if {k: stored.get(k) for k in meta} != meta:
        return False  # another version or config: retrain quietly, it is not damage
    blob = weights_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != stored.get("sha256"):
        raise ValueError(f"{WEIGHTS} does not match the checksum in {META}")
    model.load_state_dict(st_load(blob), strict=True)
    return True


def _save(folder: Path, meta: dict[str, Any], model: nn.Module) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = st_save(state)
    _atomic_write(folder / WEIGHTS, blob)
    manifest = {**meta, "sha256": hashlib.sha256(blob).hexdigest(), "torch": torch.__version__}
    _atomic_write(folder / META, json.dumps(manifest, indent=2, sort_keys=True).encode())


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename it over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
