"""Hugging Face helpers for the zoo: quiet, offline loading from local folders."""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def quiet():
    """Silence transformers' progress bars and load reports for the duration; restores them after."""
    from transformers.utils import logging

    bars, level = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()
