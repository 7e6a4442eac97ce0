"""Local Hugging Face folders: build models from config.json without any hub access."""
from __future__ import annotations

from pathlib import Path

from torch import nn


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("loading a Hugging Face folder needs transformers: pip install modelpress[hf]") from None
    return transformers


def _model_class(folder: Path):
    tr = _transformers()
    config = tr.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    archs = getattr(config, "architectures", None) or []
    cls = getattr(tr, archs[0], None) if archs else None
    if cls is None:
        cls = tr.AutoModel
    return config, cls


def model_from_config(folder: "str | Path") -> nn.Module:
    """The architecture of a local HF folder with freshly initialised weights (for `load` to fill)."""
    config, cls = _model_class(Path(folder))
    if cls is _transformers().AutoModel:
        return cls.from_config(config).eval()
    return cls._from_config(config).eval()


def load_pretrained(folder: "str | Path") -> nn.Module:
    """The float model of a local HF folder, with its weights (local files only)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a Hugging Face model folder (no config.json)")
    _, cls = _model_class(folder)
    return cls.from_pretrained(str(folder), local_files_only=True).eval()
