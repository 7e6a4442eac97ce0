"""`modelpress compress` (the pipeline); filled in with the compress pipeline."""
from __future__ import annotations


def add_compress_parser(sub) -> None:
    return None
