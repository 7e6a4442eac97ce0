"""Hugging Face files in a saved folder: config.json, generation config and tokenizer beside modelpress's
tensors, so that `mp.load(folder)` rebuilds the model with nothing else.

The folder is NOT a transformers checkpoint: its tensors are packed codes that transformers cannot read. So
that `from_pretrained(folder)` fails loudly instead of returning a randomly initialised model, the tensors are
written to `modelpress.safetensors` (transformers finds no weights file and raises) and config.json carries
`quantization_config: {"quant_method": "modelpress", ...}` naming what to use instead. For a checkpoint that
transformers and vLLM load, export to compressed-tensors (`mp.export(model, out, format="compressed-tensors")`).
"""
from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

HF_TENSORS = "modelpress.safetensors"
QUANT_METHOD = "modelpress"
HOW_TO_LOAD = "modelpress.load(folder): this folder holds modelpress's packed codes, not a transformers checkpoint"

# files a tokenizer or processor is made of (copied from a source folder as they are)
TOKENIZER_PATTERNS = ("tokenizer*.json", "tokenizer.model", "tokenizer*.txt", "vocab.*", "merges.txt",
                      "special_tokens_map.json", "added_tokens.json", "spiece.model", "spm.model",
                      "sentencepiece*.model", "*.tiktoken", "chat_template.*", "preprocessor_config.json",
                      "processor_config.json", "feature_extractor_config.json", "image_processor_config.json",
                      "video_preprocessor_config.json")


def is_hf_model(model: nn.Module) -> bool:
    """A transformers PreTrainedModel (without importing transformers for models that are not)."""
    tr = sys.modules.get("transformers")
    return tr is not None and isinstance(model, tr.PreTrainedModel)


def tokenizer_files(folder: "str | Path") -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in TOKENIZER_PATTERNS))


def check_tokenizer(tokenizer: Any) -> None:
    """Fail before any work on a tokenizer argument that cannot be written."""
    if tokenizer is None or hasattr(tokenizer, "save_pretrained"):
        return
    if not isinstance(tokenizer, (str, Path)):
        raise TypeError(f"tokenizer must be a tokenizer/processor object or a folder, got {type(tokenizer).__name__}")
    if not Path(tokenizer).is_dir():
        raise ValueError(f"tokenizer folder {tokenizer} does not exist")
    if not tokenizer_files(tokenizer) and not (Path(tokenizer) / "generation_config.json").is_file():
        raise ValueError(f"{tokenizer} holds no tokenizer files (tokenizer.json, vocab.txt, tokenizer.model, ...)")


def float_dtype(model: nn.Module) -> "torch.dtype | None":
    """The dtype of the model's first floating-point parameter (None: it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def _set_dtype(config: Any, dtype: "torch.dtype") -> None:
    """config.json's dtype field: `dtype` from transformers 4.56 on, `torch_dtype` before (as a string, as saved)."""
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    setattr(config, key, str(dtype).removeprefix("torch."))


def write_hf_files(model: nn.Module, folder: Path, tokenizer: Any = None, config: Any = None,
                   quantization_config: dict[str, Any] | None = None) -> list[str]:
    """Write config.json, generation_config.json and the tokenizer into `folder`. `tokenizer`: an object with
    save_pretrained, or a folder whose tokenizer files are copied. config.json gets `quantization_config`
    (default: the modelpress marker that keeps from_pretrained off modelpress's own tensors)."""
    config = copy.deepcopy(model.config if config is None else config)
    config.architectures = [type(model).__name__]
    dtype = float_dtype(model)
    if dtype is not None:  # the dtype the model is in now (.half() after loading does not update config.dtype)
        _set_dtype(config, dtype)
    config.quantization_config = quantization_config or {
        "quant_method": QUANT_METHOD, "load_with": HOW_TO_LOAD,
        "export": "modelpress export FOLDER --format compressed-tensors --out DIR"}
    config.save_pretrained(str(folder))
    written = ["config.json"]
    gen = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", lambda: False)()
    if gen is not None and can_generate:
        gen.save_pretrained(str(folder))
        written.append("generation_config.json")
    if tokenizer is None:
        return written
    if hasattr(tokenizer, "save_pretrained"):
        before = set(p.name for p in folder.iterdir())
        tokenizer.save_pretrained(str(folder))
        return written + sorted(set(p.name for p in folder.iterdir()) - before)
    src = Path(tokenizer)
    for f in tokenizer_files(src):
        shutil.copy2(f, folder / f.name)
        written.append(f.name)
    if "generation_config.json" not in written and (src / "generation_config.json").is_file():
        shutil.copy2(src / "generation_config.json", folder / "generation_config.json")
        written.append("generation_config.json")
    return written


def config_digest(path: Path) -> str | None:
    """sha256 of config.json's content as canonical JSON (sorted keys, no spaces): indentation and line endings
    (a git checkout's CRLF) do not change it, any value does. None when it is not JSON."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return None
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def model_for_saved(path: "str | Path", manifest: dict[str, Any]) -> nn.Module:
    """The float architecture of a saved folder that holds a config.json (fresh weights, for `load` to fill).
    The model is built from config.json before any of its tensors can be compared with the saved ones, so a
    config.json changed since the save (a layer count or a vocabulary size off by orders of magnitude would build
    for minutes or exhaust the memory) is refused first: its checksum is in the manifest."""
    from ..hf import model_from_config
    from .manifest import MANIFEST

    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"{path} has no config.json, so its architecture is unknown: pass the float model, "
                         "mp.load(path, MyModel())")
    sha = manifest.get("hf_config_sha256")  # (folders saved before it was recorded have none)
    if sha is not None and config_digest(config) != sha:
        raise ValueError(f"{config} was changed after the model was saved (its sha256 differs from the one in "
                         f"{MANIFEST}): restore it, or pass the float model, mp.load(path, model)")
    return model_from_config(path)
