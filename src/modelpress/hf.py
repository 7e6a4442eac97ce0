"""Local Hugging Face folders: build models from config.json without any hub access; tell transformers that a
model holds modelpress layers (so `save_pretrained` refuses it clearly instead of writing weights that
`from_pretrained` would silently replace with random ones)."""
from __future__ import annotations

import json
import sys
from functools import lru_cache
from pathlib import Path

from torch import nn

MODELPRESS_QUANT_METHOD = "modelpress"


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("loading a Hugging Face folder needs transformers: pip install modelpress[hf]") from None
    return transformers


def _model_class(folder: Path):
    tr = _transformers()
    config = tr.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    qc = getattr(config, "quantization_config", None)
    if isinstance(qc, dict) and qc.get("quant_method") == MODELPRESS_QUANT_METHOD:
        del config.quantization_config  # a folder saved by modelpress: the float architecture is wanted
    archs = getattr(config, "architectures", None) or []
    name = archs[0] if isinstance(archs, (list, tuple)) and archs and isinstance(archs[0], str) else None
    cls = getattr(tr, name, None) if name else None
    if cls is None:
        cls = tr.AutoModel
    elif not (isinstance(cls, type) and issubclass(cls, tr.PreTrainedModel)):
        raise ValueError(f"'architectures' names {name!r}, which is not a transformers model class")
    return config, cls


def model_from_config(folder: "str | Path") -> nn.Module:
    """The architecture of a local HF folder with freshly initialised weights (for `load` to fill)."""
    try:
        config, cls = _model_class(Path(folder))
    except ImportError:
        raise
    except Exception as e:  # transformers' config validation raises its own types
        raise ValueError(f"cannot read {Path(folder) / 'config.json'}: {_first_line(e)}") from None
    try:
        if cls is _transformers().AutoModel:
            return cls.from_config(config).eval()
        return cls._from_config(config).eval()
    except ImportError:
        raise
    except Exception as e:  # a config that does not fit its architecture: transformers raises many types
        raise ValueError(f"cannot build the model of {Path(folder) / 'config.json'}: {type(e).__name__}: "
                         f"{_first_line(e)}") from None


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def load_pretrained(folder: "str | Path") -> nn.Module:
    """The float model of a local HF folder, with its weights (local files only). A missing or corrupt
    config.json, missing weights and unreadable weight files are ValueErrors that name the folder."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a Hugging Face model folder (no config.json)")
    if (folder / "modelpress.json").is_file():
        raise ValueError(f"{folder} is a folder saved by modelpress (already quantized), not a float Hugging Face "
                         "model: load it with modelpress.load(folder)")
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise ValueError(f"Hugging Face folder {folder} has a config.json but no weights ({', '.join(WEIGHT_FILES)})")
    method = _quant_method(folder)
    if method is not None:  # a quantized checkpoint: transformers would build its own quantized layers
        raise ValueError(f"{folder} is an already quantized checkpoint (quantization_config: {method}), not a float "
                         "Hugging Face model: give the float model it was made from")
    try:
        _, cls = _model_class(folder)
    except ImportError:
        raise
    except Exception as e:  # transformers' config validation raises its own types
        raise ValueError(f"cannot read {folder / 'config.json'}: {_first_line(e)}") from None
    try:
        return cls.from_pretrained(str(folder), local_files_only=True).eval()
    except ImportError:
        raise
    except Exception as e:  # corrupt or mismatched weight files: transformers raises many types
        raise ValueError(f"cannot load the weights of Hugging Face folder {folder}: {type(e).__name__}: "
                         f"{_first_line(e)}") from None


def _quant_method(folder: Path) -> str | None:
    """config.json's quantization_config.quant_method (compressed-tensors, gptq, awq, bitsandbytes, ...), if any."""
    try:
        q = json.loads((folder / "config.json").read_text()).get("quantization_config")
    except (ValueError, OSError, AttributeError):  # (unreadable: the model class check says so)
        return None
    return str(q.get("quant_method", "unknown")) if isinstance(q, dict) else None


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


NOT_SERIALIZABLE = ("this model holds modelpress quantized layers, which transformers' save_pretrained cannot write "
                    "(from_pretrained would return randomly initialised layers). Save it with "
                    "modelpress.save(model, folder) and reload with modelpress.load(folder); for transformers/vLLM "
                    "use modelpress.export(model, folder, format='compressed-tensors'); or call "
                    "model.dequantize() first for a float checkpoint")


@lru_cache(maxsize=None)
def _quantizer_class():
    from transformers.quantizers.base import HfQuantizer

    class ModelpressHfQuantizer(HfQuantizer):
        """Marks a transformers model quantized by modelpress (set as `model.hf_quantizer`): save_pretrained
        asks `is_serializable`, which raises with what to do instead; `model.dequantize()` gives the float model."""

        requires_calibration = False

        def is_serializable(self, *args, **kwargs):
            raise ValueError(NOT_SERIALIZABLE)

        @property
        def is_trainable(self) -> bool:
            return False

        def _process_model_before_weight_loading(self, model, **kwargs):
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            return model

        def _dequantize(self, model, dtype=None):
            from .io.dequant import dequantize

            return dequantize(model, inplace=True)

        def __reduce__(self):  # (a class made here is not importable by name: pickle rebuilds it through this module)
            return _new_quantizer, ()

    return ModelpressHfQuantizer


def _new_quantizer():
    return _quantizer_class()(_QuantConfig(), pre_quantized=True)


class _QuantConfig:
    """The `quantization_config` transformers reads from a quantizer (`quant_method`, `to_dict`)."""

    quant_method = MODELPRESS_QUANT_METHOD

    def to_dict(self) -> dict:
        return {"quant_method": self.quant_method}


def mark_quantized(model: nn.Module) -> None:
    """If `model` is a transformers model, attach modelpress's HfQuantizer (see `_quantizer_class`)."""
    tr = sys.modules.get("transformers")
    if tr is None or not isinstance(model, tr.PreTrainedModel):
        return
    current = getattr(model, "hf_quantizer", None)
    if current is None:
        model.hf_quantizer = _new_quantizer()


def unmark_quantized(model: nn.Module) -> None:
    """Undo `mark_quantized` (after `dequantize`: the model is float again)."""
    q = model.__dict__.get("hf_quantizer")
    if q is not None and getattr(q.quantization_config, "quant_method", None) == MODELPRESS_QUANT_METHOD:
        del model.hf_quantizer
