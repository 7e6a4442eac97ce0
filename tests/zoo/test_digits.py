"""digits-cnn / digits-dwcnn: data split, model structure, tiny training, determinism and the cache.

The full models are not trained here (about 5 s each on 2 cores; run `modelpress zoo build digits-cnn`).
"""
import pytest
import torch
from torch import nn

pytest.importorskip("sklearn")
from modelpress.zoo import digits  # noqa: E402

KINDS = ["cnn", "dwcnn"]


@pytest.fixture(scope="module")
def split():
    return digits.load_split()


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_split_is_fixed_stratified_and_scaled(split):
    x_train, y_train, x_test, y_test = split
    assert x_train.shape == (1257, 1, 8, 8) and x_test.shape == (540, 1, 8, 8)
    assert x_train.dtype == torch.float32 and y_test.dtype == torch.int64
    assert 0.0 <= float(x_train.min()) and float(x_train.max()) <= 1.0
    counts = torch.bincount(y_test, minlength=10)
    assert int(counts.min()) >= 52 and int(counts.max()) <= 56  # stratified: ~54 of each digit
    assert all(torch.equal(a, b) for a, b in zip(split, digits.load_split()))


def test_full_models_are_conv_bn_relu_with_enough_weights():
    cnn = digits.DigitsNet("cnn", 16)
    dw = digits.DigitsNet("dwcnn", 16)
    for model, least in [(cnn, 50_000), (dw, 25_000)]:
        n_params = sum(p.numel() for p in model.parameters())
        weight_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        assert n_params >= least and weight_params / n_params > 0.95
        assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        for block in model.features:  # every conv is followed by its BatchNorm and a ReLU
            if isinstance(block, nn.Sequential):
                assert [type(m) for m in block] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    depthwise = [m for m in dw.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 3 and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert cnn(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_build_learns_and_caches_apart(kind, split, tmp_path):
    model = digits.get_model(kind, tiny=True, cache_dir=tmp_path, split=split)
    assert not model.training
    assert accuracy(model, split[2], split[3]) >= 0.85
    name = digits.KINDS[kind]
    assert [p.name for p in tmp_path.iterdir()] == [f"{name}-tiny"]  # the full cache is not touched
    assert (tmp_path / f"{name}-tiny" / "model.safetensors").is_file()


@pytest.mark.parametrize("kind", KINDS)
def test_two_builds_give_identical_weights_and_keep_the_rng(kind, split, tmp_path):
    torch.manual_seed(7)
    state = torch.get_rng_state()
    a = digits.get_model(kind, tiny=True, cache_dir=tmp_path / "a", split=split)
    b = digits.get_model(kind, tiny=True, cache_dir=tmp_path / "b", split=split)
    assert same_weights(a, b)
    assert torch.equal(torch.get_rng_state(), state)


def test_cache_round_trip_loads_without_training(split, tmp_path, monkeypatch):
    first = digits.get_model("cnn", tiny=True, cache_dir=tmp_path, split=split)

    def no_training(*args, **kwargs):
        raise AssertionError("the cached model was retrained")

    monkeypatch.setattr(digits, "train", no_training)
    second = digits.get_model("cnn", tiny=True, cache_dir=tmp_path, split=split)
    assert same_weights(first, second)
    with torch.no_grad():
        assert torch.equal(first(split[2]), second(split[2]))


def test_corrupt_cache_is_rebuilt(split, tmp_path):
    first = digits.get_model("dwcnn", tiny=True, cache_dir=tmp_path, split=split)
    weights = tmp_path / "digits-dwcnn-tiny" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.warns(UserWarning, match="rebuilding"):
        second = digits.get_model("dwcnn", tiny=True, cache_dir=tmp_path, split=split)
    assert same_weights(first, second)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown"):
        digits.DigitsConfig.preset("resnet")


@pytest.mark.parametrize("name", ["digits-cnn", "digits-dwcnn"])
def test_zoo_entry(name, split, tmp_path):
    tasks = pytest.importorskip("modelpress.evaluate.tasks")
    from modelpress import zoo

    entry = zoo.build(name, tiny=True, cache_dir=tmp_path)
    assert entry.name == name and not entry.model.training
    assert len(entry.calib) == 8 and all(b.shape == (32, 1, 8, 8) for b in entry.calib)
    assert isinstance(entry.task, tasks.ClassificationTask)
    scores = tasks.evaluate_model(entry.task, entry.model)
    assert scores["accuracy"] == pytest.approx(accuracy(entry.model, split[2], split[3]))


def test_training_split_is_disjoint_from_evaluation(tmp_path):
    from modelpress import zoo

    entry = zoo.build("digits-cnn", tiny=True, cache_dir=tmp_path)
    train_x = torch.cat([x for x, _ in entry.train])
    test_x = torch.cat([x for x, _ in entry.task.batches()])
    assert len(train_x) + len(test_x) == 1797 and all(y.dtype == torch.long for _, y in entry.train)
    seen = {tuple(r.flatten().tolist()) for r in train_x}
    overlap = sum(tuple(r.flatten().tolist()) in seen for r in test_x)
    assert overlap <= 5  # sklearn's digits has a handful of duplicate images; the split itself is disjoint
