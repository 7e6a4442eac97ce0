"""The zoo weight cache: round trip, atomic files, and a rebuild (with a warning) on any damage."""
import json
import warnings

import pytest
import torch
from torch import nn

from modelpress.zoo import _cache

META = {"name": "toy", "version": 1, "config": {"width": 3, "sizes": (4, 5)}}


class Counter:
    """make/train callables that count how often the model was trained."""

    def __init__(self, width=3):
        self.width, self.trained = width, 0

    def make(self):
        with _cache.deterministic(0):
            return nn.Sequential(nn.Linear(4, self.width), nn.BatchNorm1d(self.width))

    def train(self, model):
        self.trained += 1
        with torch.no_grad():
            model[0].weight.add_(1.0)


def build(folder, counter=None, meta=META, rebuild=False):
    counter = counter or Counter()
    return _cache.cached_model(folder, meta, counter.make, counter.train, rebuild=rebuild), counter


def same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_loads_without_training(tmp_path):
    first, c1 = build(tmp_path / "toy")
    assert c1.trained == 1 and not first.training
    assert sorted(p.name for p in (tmp_path / "toy").iterdir()) == ["meta.json", "model.safetensors"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second, c2 = build(tmp_path / "toy")
    assert c2.trained == 0 and not second.training
    assert same(first, second)


def test_rebuild_flag_retrains(tmp_path):
    build(tmp_path / "toy")
    _, counter = build(tmp_path / "toy", rebuild=True)
    assert counter.trained == 1


def test_other_config_or_version_retrains_quietly(tmp_path):
    build(tmp_path / "toy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, c1 = build(tmp_path / "toy", meta={**META, "version": 2})
        _, c2 = build(tmp_path / "toy", meta={**META, "config": {"width": 3, "sizes": (4, 6)}})
    assert c1.trained == 1 and c2.trained == 1


def _truncate(p):
    p.write_bytes(p.read_bytes()[:-7])


def _garbage(p):
    p.write_bytes(b"not a safetensors file")


def _flip_last_byte(p):  # a valid file with one wrong weight: only the checksum sees it
    b = bytearray(p.read_bytes())
    b[-1] ^= 0xFF
    p.write_bytes(bytes(b))


@pytest.mark.parametrize("damage", [_truncate, _garbage, _flip_last_byte, lambda p: p.unlink()])
def test_damaged_weights_are_rebuilt_with_a_warning(tmp_path, damage):
    first, _ = build(tmp_path / "toy")
    damage(tmp_path / "toy" / _cache.WEIGHTS)
    with pytest.warns(UserWarning, match="rebuilding"):
        second, counter = build(tmp_path / "toy")
    assert counter.trained == 1 and same(first, second)
    third, counter = build(tmp_path / "toy")  # the rebuilt cache is good again
    assert counter.trained == 0 and same(first, third)


def test_damaged_manifest_is_rebuilt(tmp_path):
    build(tmp_path / "toy")
    (tmp_path / "toy" / _cache.META).write_text("{ truncated")
    with pytest.warns(UserWarning, match="rebuilding"):
        _, counter = build(tmp_path / "toy")
    assert counter.trained == 1


def test_shape_mismatch_is_rebuilt(tmp_path):
    folder = tmp_path / "toy"
    _cache._save(folder, json.loads(json.dumps(META)), Counter(width=5).make())  # valid file, other shapes
    with pytest.warns(UserWarning, match="rebuilding"):
        model, counter = build(folder)
    assert counter.trained == 1 and model[0].weight.shape == (3, 4)


def test_no_temporary_files_are_left(tmp_path):
    build(tmp_path / "toy")
    build(tmp_path / "toy", rebuild=True)
    assert not [p for p in (tmp_path / "toy").iterdir() if p.name.endswith(".tmp")]


def test_unwritable_cache_still_returns_the_model(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the cache folder's parent should be
    with pytest.warns(UserWarning, match="could not write"):
        model, counter = build(blocker / "toy")
    assert counter.trained == 1 and isinstance(model, nn.Module)


def test_deterministic_seeds_then_restores_rng_and_threads():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    draws = []
    for _ in range(2):
        with _cache.deterministic(0):
            assert torch.get_num_threads() == 1
            draws.append(torch.rand(2))
    assert torch.equal(draws[0], draws[1])
    assert torch.equal(torch.rand(3), expected) and torch.get_num_threads() == threads
