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
    try:
        config, cls = _model_class(Path(folder))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot read {Path(folder) / 'config.json'}: {_first_line(e)}") from None
    if cls is _transformers().AutoModel:
        return cls.from_config(config).eval()
    return cls._from_config(config).eval()


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def load_pretrained(folder: "str | Path") -> nn.Module:
    """The float model of a local HF folder, with its weights (local files only). A missing or corrupt
    config.json, missing weights and unreadable weight files are ValueErrors that name the folder."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a Hugging Face model folder (no config.json)")
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise ValueError(f"Hugging Face folder {folder} has a config.json but no weights ({', '.join(WEIGHT_FILES)})")
    try:
        _, cls = _model_class(folder)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot read {folder / 'config.json'}: {_first_line(e)}") from None
    try:
        return cls.from_pretrained(str(folder), local_files_only=True).eval()
    except ImportError:
        raise
    except Exception as e:  # corrupt or mismatched weight files: transformers raises many types
        raise ValueError(f"cannot load the weights of Hugging Face folder {folder}: {type(e).__name__}: "
                         f"{_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
