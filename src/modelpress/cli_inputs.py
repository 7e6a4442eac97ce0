"""What the `modelpress` command reads from the user (MODEL, --state-dict, --calib, --out), checked before any
long work, with errors in the command's own words."""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator


class CLIError(Exception):
    """An error to report to the user in one line (exit code 1)."""


class UsageError(CLIError):
    """Flags that do not go together or a value out of range, found after parsing: one line, exit code 2."""


def first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


@contextlib.contextmanager
def _cwd_importable() -> Iterator[None]:
    """The current folder on sys.path while a factory is imported and called, as `python -m` users expect
    (the `modelpress` script, unlike `python -m`, does not put it there)."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def load_model(spec: str, state_dict: str | None = None, tiny: bool = False):
    """MODEL argument -> (float nn.Module, calibration inputs or None, zoo entry or None).

    `zoo:NAME` builds a zoo model; a folder with config.json is a local Hugging Face model;
    `package.module:factory` (found in the current folder too) calls factory() and loads `state_dict`
    (.safetensors, or .pt with weights_only=True).
    """
    import torch

    if spec.startswith("zoo:"):
        if state_dict:
            raise CLIError("--state-dict applies to package.module:factory models; zoo models bring their own weights")
        from . import zoo

        entry = zoo.build(spec[4:], tiny=tiny)
        return entry.model, entry.calib, entry
    path = Path(spec)
    if path.is_dir():
        if state_dict:
            raise CLIError("--state-dict applies to package.module:factory models, not to a Hugging Face folder")
        from .hf import load_pretrained

        return load_pretrained(path), None, None
    if ":" not in spec:
        raise CLIError(f"MODEL {spec!r} is not a folder, a zoo:NAME nor a package.module:factory")
    mod, _, fn = spec.partition(":")
    with _cwd_importable():
        try:
            factory = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise CLIError(f"cannot import {spec!r}: {e}") from None
        except Exception as e:  # the module itself fails on import
            raise CLIError(f"importing {mod!r} failed: {type(e).__name__}: {first_line(e)}") from None
        try:
            model = factory()
        except Exception as e:
            raise CLIError(f"MODEL factory {spec} raised {type(e).__name__}: {first_line(e)}") from None
    if not isinstance(model, torch.nn.Module):
        raise CLIError(f"{spec} returned {type(model).__name__}, not a torch nn.Module")
    if state_dict:
        _load_state_dict(model, read_state_dict(state_dict), state_dict, spec)
    return model.eval(), None, None


def hf_source(spec: str) -> str | None:
    """A Hugging Face source folder with tokenizer files (they travel with the saved model), else None."""
    from .io.hf_folder import tokenizer_files

    return spec if (Path(spec) / "config.json").is_file() and tokenizer_files(spec) else None


def _load_state_dict(model, sd: dict[str, Any], file: str, spec: str) -> None:
    """Values that would change meaning when cast (integers into float parameters, or the reverse) are refused:
    load_state_dict would silently copy int32 codes into float weights."""
    import torch

    own = model.state_dict()
    for k, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise CLIError(f"--state-dict {file}: entry {k!r} is a {type(t).__name__}, not a tensor")
        if k in own and torch.is_floating_point(own[k]) != torch.is_floating_point(t):
            raise CLIError(f"--state-dict {file}: tensor {k!r} is {str(t.dtype).replace('torch.', '')} but {spec} "
                           f"has {str(own[k].dtype).replace('torch.', '')} there; convert the file to the model's "
                           "dtypes (a cast would change the values)")
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise CLIError(f"--state-dict {file} does not fit {spec}: {' '.join(str(e).split())}") from None


def read_state_dict(file: str) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    p = Path(file)
    if not p.is_file():
        raise CLIError(f"--state-dict {file} {'is a folder, not a file' if p.is_dir() else 'does not exist'}")
    if p.suffix not in (".safetensors", ".pt", ".pth", ".bin"):
        raise CLIError(f"--state-dict {file}: use a .safetensors file (or .pt/.pth saved tensors)")
    try:
        if p.suffix == ".safetensors":
            return load_file(str(p))
        sd = torch.load(str(p), map_location="cpu", weights_only=True)  # never unpickles arbitrary objects
    except Exception as e:  # corrupt file, or a pickle holding more than tensors (refused by weights_only)
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if ln.startswith("WeightsUnpickler error")), lines[0] if lines else repr(e))
        raise CLIError(f"cannot read --state-dict {file}: {why.split(' Please use')[0]}") from None
    if not isinstance(sd, dict):
        raise CLIError(f"--state-dict {file} holds a {type(sd).__name__}, not a dict of tensors")
    return sd


def read_tensor_file(file: str, flag: str, holds: str) -> dict[str, Any]:
    """The tensors of a safetensors file given as `flag` (--calib, --inputs), checked: a file, readable, not empty,
    no NaN or Inf (`holds`: what its tensors are, for the message about a folder)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(file)
    if p.is_dir():
        raise CLIError(f"{flag} {file} is a folder; give a .safetensors file whose tensors are {holds}")
    if not p.is_file():
        raise CLIError(f"{flag} {file} does not exist")
    try:
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise CLIError(f"{flag} {file} is not a readable safetensors file ({first_line(e)})") from None
    if not tensors:
        raise CLIError(f"{flag} {file} holds no tensors")
    nonfinite = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if nonfinite:
        raise CLIError(f"{flag} {file}: tensor {nonfinite[0]!r} holds NaN or infinite values")
    return tensors


def read_calib(file: str) -> list:
    """A safetensors file of calibration batches, in key order (digit runs by value): a tensor named `B` is one
    batch (the model's one input); tensors named `B.NAME` together form batch `B`: keyword inputs (`b0.input_ids`,
    `b0.attention_mask`, `b0.decoder_input_ids`), or positional ones when every NAME is a number (`b0.0`, `b0.1`)."""
    tensors = read_tensor_file(file, "--calib", "input batches")
    bad = [k for k, t in tensors.items() if t.dim() == 0]
    if bad:
        raise CLIError(f"--calib {file}: tensor {bad[0]!r} is a scalar; each tensor must be one batch of inputs")
    groups: dict[str, dict] = {}
    for key, t in tensors.items():
        batch, dot, name = key.partition(".")
        if dot and not (batch and name):
            raise CLIError(f"--calib {file}: tensor {key!r}: name the parts of a batch BATCH.INPUT (e.g. "
                           "b0.input_ids)")
        group = groups.setdefault(batch, {})
        if (dot and None in group) or (not dot and group):
            raise CLIError(f"--calib {file}: batch {batch!r} is both one tensor and {batch}.INPUT parts")
        group[name if dot else None] = t
    out = []
    for batch in sorted(groups, key=natural_key):
        parts = groups[batch]
        if None in parts:
            out.append(parts[None])
        elif all(n.isdigit() for n in parts):
            numbers = sorted(int(n) for n in parts)
            if numbers != list(range(len(numbers))):
                raise CLIError(f"--calib {file}: batch {batch!r} has positional parts {numbers}; number them 0, 1, "
                               "2 ...")
            out.append(tuple(parts[n] for n in sorted(parts, key=int)))
        elif any(n.isdigit() for n in parts):
            raise CLIError(f"--calib {file}: batch {batch!r} mixes positional parts (numbers) and keyword parts")
        else:
            out.append(dict(sorted(parts.items())))
    return out


def natural_key(name: str) -> list:
    """Sort key putting digit runs in numeric order: batch2 before batch10."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def check_batch(model, batch, file: str) -> None:
    """The first --calib batch through the model (one forward, before the long work)."""
    from .calibrate import dry_run

    try:
        dry_run(model, batch)
    except ValueError as e:
        cause = e.__cause__ or e
        raise CLIError(f"--calib {file}: its first batch ({_describe(batch)}) does not run through the model "
                       f"({type(cause).__name__}: {first_line(cause)})") from None


def _describe(batch) -> str:
    import torch

    if isinstance(batch, torch.Tensor):
        return f"{str(batch.dtype).replace('torch.', '')} {list(batch.shape)}"
    if isinstance(batch, dict):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, tuple):
        return "(" + ", ".join(_describe(v) for v in batch) + ")"
    return type(batch).__name__


PACKAGE = "MODEL's package"


def input_paths(model: str | None, **files: str | None) -> list[tuple[str, Path]]:
    """(what, resolved path) of every input the command reads or keeps: MODEL's folder, or its module file and the
    package that holds it, --state-dict, --calib, --recipe (when a file) ..., the zoo cache and the kernel cache."""
    from .quant.kernels.build import cache_root
    from .zoo import default_cache_dir

    out = [("the zoo cache", default_cache_dir()), ("the kernel cache", cache_root())]
    if not model or model.startswith("zoo:"):
        pass
    elif Path(model).is_dir():
        out.append(("MODEL", Path(model)))
    elif ":" in model:
        name = model.partition(":")[0]
        with _cwd_importable():
            try:
                spec = importlib.util.find_spec(name)
                top = importlib.util.find_spec(name.partition(".")[0]) if "." in name else None
            except (ImportError, ValueError):
                spec = top = None
        if spec is not None and spec.origin and os.path.isfile(spec.origin):
            out.append(("MODEL's module", Path(spec.origin)))
        for pkg in (spec, top):  # the package the factory's module is (or lies in): the modules it imports
            for where in (pkg.submodule_search_locations or []) if pkg is not None else []:
                out.append((PACKAGE, Path(where)))
    for opt, f in files.items():
        if f and os.path.exists(f):
            out.append((f"--{opt.replace('_', '-')}", Path(f)))
    return [(what, Path(os.path.realpath(p))) for what, p in out]


def check_out(path: str, overwrite: bool, inputs: list[tuple[str, Path]] = ()) -> Path:
    """The --out folder, checked before any work: refused when it is, contains or lies inside an input (so that
    --overwrite can never delete one), when it exists and is not empty (unless --overwrite), and when it could
    not be written."""
    from .io.writer import check_target

    out = Path(os.path.realpath(os.path.expanduser(path)))
    for what, p in inputs:
        if what == PACKAGE and p in out.parents and not (out.is_dir() and any(out.iterdir())):
            continue  # a new (or empty) folder inside the factory's package: nothing of it is replaced
        if out == p or out in p.parents or (p.is_dir() and p in out.parents):
            rel = "is" if out == p else ("contains" if out in p.parents else "lies inside")
            raise CLIError(f"--out {path} {rel} {what} ({p}): choose an output folder apart from the inputs")
    try:
        check_target(path, overwrite)
    except FileExistsError as e:
        if "not empty" in str(e):
            raise CLIError(f"--out {path} exists and is not empty; pass --overwrite to replace it") from None
        raise CLIError(f"--out {path}: {e}") from None
    except (PermissionError, NotADirectoryError, ValueError) as e:
        raise CLIError(f"--out {path}: {e}") from None
    return Path(path)
