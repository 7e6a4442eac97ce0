"""ctr: synthetic click logs, the DLRM-style model, tiny training, determinism and the cache.

The full model is not trained here (about 10 s on one core; run `modelpress zoo build ctr`).
"""
import pytest
import torch
from torch import nn

from modelpress.zoo import ctr

TINY = ctr.CTRConfig.preset(tiny=True)


@pytest.fixture(scope="module")
def data():
    return ctr.generate(TINY)


def auc(scores, labels):
    """Probability that a random click scores above a random non-click (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).double().mean()
    ties = (pos[:, None] == neg[None, :]).double().mean()
    return float(greater + 0.5 * ties)


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def embedding_byte_fraction(model):
    emb = sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
              if isinstance(m, (nn.Embedding, nn.EmbeddingBag)))
    return emb / sum(t.numel() * t.element_size() for t in model.state_dict().values())


def test_logs_are_deterministic_power_law_and_learnable(data):
    train, test = data
    assert train.dense.shape == (TINY.n_train, TINY.n_dense) and train.dense.dtype == torch.float32
    assert train.sparse.shape == (TINY.n_train, len(TINY.cardinalities)) and train.sparse.dtype == torch.int64
    assert len(test.clicks) == TINY.n_test and set(test.clicks.unique().tolist()) == {0.0, 1.0}
    again = ctr.generate(TINY)
    assert all(torch.equal(a, b) for a, b in zip(data[0] + data[1], again[0] + again[1]))
    for f, card in enumerate(TINY.cardinalities):
        col = train.sparse[:, f]
        assert 0 <= int(col.min()) and int(col.max()) < card
        counts = torch.bincount(col, minlength=card).sort(descending=True).values.double()
        assert counts[0] > 10 * counts[card // 2]  # the head is far more frequent than the median value
    assert 0.1 < float(train.clicks.mean()) < 0.6
    assert auc(test.p_true, test.clicks) > 0.75  # the hidden model is informative


def test_model_forward_and_embedding_tables():
    model = ctr.CTRModel((10, 20, 30), n_dense=5, dim=4, bottom=(8,), top=(8,))
    assert all(isinstance(e, nn.EmbeddingBag) and e.mode == "sum" for e in model.embeddings)
    dense, sparse = torch.randn(6, 5), torch.stack([torch.randint(0, c, (6,)) for c in (10, 20, 30)], dim=1)
    out = model(dense, sparse)
    assert out.shape == (6,)
    assert torch.allclose(model(dense[:2], sparse[:2]), out[:2], atol=1e-6)  # rows are independent


@pytest.mark.parametrize("cfg", [ctr.CTRConfig(), TINY], ids=["full", "tiny"])
def test_embedding_tables_hold_most_bytes(cfg):
    model = ctr.make_model(cfg)  # untrained: the sizes do not depend on training
    assert embedding_byte_fraction(model) > 0.8


def test_tiny_build_learns_and_caches_apart(data, tmp_path):
    model = ctr.get_model(tiny=True, cache_dir=tmp_path, train_data=data[0])
    assert not model.training
    test = data[1]
    with torch.no_grad():
        scores = model(test.dense, test.sparse)
    assert 0.62 < auc(scores, test.clicks) < auc(test.p_true, test.clicks)
    assert [p.name for p in tmp_path.iterdir()] == ["ctr-tiny"]  # the full cache is not touched


def test_two_builds_give_identical_weights_and_keep_the_rng(data, tmp_path):
    state = torch.get_rng_state()
    a = ctr.get_model(tiny=True, cache_dir=tmp_path / "a", train_data=data[0])
    b = ctr.get_model(tiny=True, cache_dir=tmp_path / "b", train_data=data[0])
    assert same_weights(a, b)
    assert torch.equal(torch.get_rng_state(), state)


def test_cache_round_trip_loads_without_training(data, tmp_path, monkeypatch):
    first = ctr.get_model(tiny=True, cache_dir=tmp_path, train_data=data[0])

    def no_training(*args, **kwargs):
        raise AssertionError("the cached model was retrained")

    monkeypatch.setattr(ctr, "train", no_training)
    second = ctr.get_model(tiny=True, cache_dir=tmp_path, train_data=data[0])
    test = data[1]
    with torch.no_grad():
        assert torch.equal(first(test.dense, test.sparse), second(test.dense, test.sparse))


def test_corrupt_cache_is_rebuilt(data, tmp_path):
    first = ctr.get_model(tiny=True, cache_dir=tmp_path, train_data=data[0])
    weights = tmp_path / "ctr-tiny" / "model.safetensors"
    weights.write_bytes(b"\0" * 64)
    with pytest.warns(UserWarning, match="rebuilding"):
        second = ctr.get_model(tiny=True, cache_dir=tmp_path, train_data=data[0])
    assert same_weights(first, second)


def test_zoo_entry(data, tmp_path):
    tasks = pytest.importorskip("modelpress.evaluate.tasks")
    from modelpress import zoo

    entry = zoo.build("ctr", tiny=True, cache_dir=tmp_path)
    assert entry.name == "ctr" and not entry.model.training
    assert len(entry.calib) == 8
    for dense, sparse in entry.calib:
        assert dense.shape == (256, TINY.n_dense) and sparse.shape == (256, len(TINY.cardinalities))
    assert isinstance(entry.task, tasks.CTRTask)
    scores = tasks.evaluate_model(entry.task, entry.model)
    test = data[1]
    with torch.no_grad():
        expected = auc(entry.model(test.dense, test.sparse), test.clicks)
    assert scores["auc"] == pytest.approx(expected, abs=1e-6)


def test_training_split(tmp_path):
    from modelpress import zoo
    from modelpress.train import supervised_loss

    entry = zoo.build("ctr", tiny=True, cache_dir=tmp_path)
    (dense, sparse), clicks = entry.train[0]
    assert clicks.dtype == torch.bool and dense.shape[0] == sparse.shape[0] == clicks.shape[0]
    assert torch.isfinite(supervised_loss(entry.model, entry.train[0]))
