"""Running calibration data through a model: calling it on any input kind, observing layer inputs."""
from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn


def call_model(model: nn.Module, inp: Any):
    """model(x) for a tensor, model(*x) for a tuple/list, model(**x) for a dict of keyword tensors."""
    if isinstance(inp, torch.Tensor):
        return model(inp)
    if isinstance(inp, Mapping):
        return model(**inp)
    if isinstance(inp, (tuple, list)):
        return model(*inp)
    raise TypeError(f"a model input must be a tensor, a tuple of tensors or a dict of tensors, got {type(inp).__name__}")


def as_batches(calib: Any, what: str = "calib") -> list[Any]:
    """`calib` as a list of model inputs, iterated once. Refuses what is not a collection of batches (a single
    tensor or dict would be iterated row by row / key by key) and an empty one, saying when it is an iterator
    that was already used up (a generator runs once)."""
    if isinstance(calib, (torch.Tensor, Mapping, str, bytes)):
        raise TypeError(f"{what} must be a list (or other iterable) of model inputs, got a single "
                        f"{type(calib).__name__}: wrap one batch as [batch]")
    try:
        it = iter(calib)
    except TypeError:
        raise TypeError(f"{what} must be a list (or other iterable) of model inputs, got {type(calib).__name__}") from None
    batches = list(it)
    if not batches:
        why = (": it is an iterator (e.g. a generator) that was already used up; an iterator runs once, so pass a "
               "list or a new generator each time") if it is calib else ""
        raise ValueError(f"{what} is empty{why}")
    return batches


def token_masks(calib: list[Any]) -> list[torch.Tensor | None]:
    """Per calibration batch, the bool [B, T] mask of its real tokens (a dict batch's `attention_mask`), or None
    (no mask: every position is real). Padded positions of a batch still flow through the layers; statistics
    taken from layer inputs (Wanda's norms, SparseGPT's Hessian) must leave them out."""
    out = []
    for b in calib:
        m = b.get("attention_mask") if isinstance(b, Mapping) else None
        out.append(m.bool() if isinstance(m, torch.Tensor) and m.dim() == 2 else None)
    return out


# batch keys (Hugging Face names) of streams other than the masked tokens: a batch holding one also feeds layers whose
# rows are not its tokens (a vision tower, an audio encoder, a decoder)
OTHER_STREAMS = ("pixel_", "image", "video", "audio", "input_features", "input_values", "decoder_", "encoder_")


def layer_masks(model: nn.Module, calib: list[Any]) -> Callable[[str], list[torch.Tensor | None]]:
    """name -> the calibration batches' token masks (token_masks) for a layer whose inputs are laid out by those
    tokens, or [] (by_token then leaves its inputs whole). A shape match alone is not enough: an encoder-decoder's
    decoder (whose length may equal the source's, shifted by one) and a vision tower (16 patches + CLS = 17 tokens)
    have inputs of the same [B, T] but other rows. So: in an encoder-decoder, the encoder's layers only; in a model
    fed another stream too (OTHER_STREAMS: pixel_values, input_features, decoder_input_ids ...), none; else all."""
    masks = token_masks(calib)
    if all(m is None for m in masks):
        return lambda name: []
    cfg = getattr(model, "config", None)
    if getattr(cfg, "is_encoder_decoder", False) and callable(getattr(model, "get_encoder", None)):
        enc = model.get_encoder()
        prefix = next((n for n, m in model.named_modules() if m is enc), None)
        if prefix is None:
            return lambda name: []
        return lambda name: masks if prefix == "" or name == prefix or name.startswith(prefix + ".") else []
    other = any(k.startswith(OTHER_STREAMS) for b in calib if isinstance(b, Mapping) for k in b)
    return (lambda name: []) if other else (lambda name: masks)


def real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows [n, K] of a layer input x [B, T, K] at the real tokens of `mask` [B, T]; x unchanged when there is
    no mask or x is not laid out by token (its leading dims differ from the mask's)."""
    if mask is None or x.dim() != 3 or tuple(x.shape[:2]) != tuple(mask.shape):
        return x
    return x[mask.to(x.device)]


def by_token(inputs: list[torch.Tensor], masks: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """A layer's inputs (one per calibration batch, as `run_sequential` hands them) restricted to real tokens.
    Unchanged when the count differs from the batches' (a layer called more than once per batch)."""
    if len(inputs) != len(masks):
        return inputs
    return [real_tokens(x, m) for x, m in zip(inputs, masks)]


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def dry_run(model: nn.Module, batch: Any, what: str = "calib", which: str = "the first batch") -> None:
    """Run one batch through `model` (eval mode, no gradients) so that wrong shapes or dtypes are reported in
    a second, before the long work, as a ValueError naming `what` (and `which` batch)."""
    try:
        with evaluating(model), torch.inference_mode():
            call_model(model, batch)
    except Exception as e:
        raise ValueError(f"{what}: {which} does not run through the model ({_one_line(e)})") from e


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode (no dropout, BatchNorm statistics not updated) for the block; every module's own
    training flag comes back afterwards. A module put in during the block (a pruned or quantized layer) gets the
    flag its name had (or its parent's), as if it had been there."""
    flags = [(m, m.training) for m in model.modules()]
    by_name = {n: m.training for n, m in model.named_modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, t in flags:
            m.training = t
        known = {id(m) for m, _ in flags}
        mods = dict(model.named_modules())
        for n, m in mods.items():  # (parents come before their children)
            if id(m) not in known:
                m.training = by_name.get(n, mods[n.rpartition(".")[0]].training if n else model.training)


def run_hooked(model: nn.Module, batches: Iterable[Any], handles: list) -> None:
    """Run every batch through `model` without gradients and in eval mode (BatchNorm statistics untouched), then
    remove the hook `handles` (also on an error)."""
    try:
        with torch.no_grad(), evaluating(model):
            for b in batches:
                call_model(model, b)
    finally:
        for h in handles:
            h.remove()


def observe_inputs(model: nn.Module, modules: Mapping[str, nn.Module], calib: Iterable[Any],
                   make_observer: Callable[[], Any], progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run every calibration input through `model`, feeding each listed module's first input to its observer."""
    if calib is None:
        raise ValueError("static activation quantization needs calibration data (calib=...)")
    observers = {name: make_observer() for name in modules}

    def observe(name: str, x: torch.Tensor) -> None:
        try:
            observers[name].update(x)
        except ValueError as e:  # e.g. NaN inputs: say which layer saw them
            raise ValueError(f"layer {name!r}: {e}") from None

    calib = list(calib)
    scope = layer_masks(model, calib)
    mask: list[torch.Tensor | None] = [None]  # the batch's real tokens: padded positions are not data

    def seen(name: str, x: torch.Tensor) -> None:
        rows = real_tokens(x, mask[0]) if scope(name) else x
        if rows.numel():
            observe(name, rows)

    hooks = [m.register_forward_pre_hook(lambda _m, args, n=n: seen(n, args[0])) for n, m in modules.items()]
    batches = 0
    try:
        with torch.inference_mode():
            for batch in calib:
                mask[0] = token_masks([batch])[0]
                call_model(model, batch)
                batches += 1
                if progress:
                    progress(batches)
    finally:
        for h in hooks:
            h.remove()
    if batches == 0:
        raise ValueError("the calibration data is empty: no batch was given")
    return observers


# ---------------------------------------------------------------------------------------------------------
# The sequential runner: layers are processed in execution order, each seeing inputs produced by the
# already-quantized layers before it. Within a model that is a stack of blocks (the largest nn.ModuleList of
# same-type modules: decoder or encoder layers), only one block and its captured inputs are worked on at a time.

class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def find_blocks(model: nn.Module, min_blocks: int = 2) -> list[tuple[str, nn.Module]]:
    """The repeated blocks of a model: children of its largest ModuleList of at least `min_blocks` modules of one
    type."""
    best, best_size = None, 0
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) >= min_blocks and len({type(c) for c in m}) == 1:
            size = sum(p.numel() for p in m.parameters())
            if size > best_size:
                best, best_size = (name, m), size
    if best is None:
        return []
    name, ml = best
    return [(f"{name}.{i}" if name else str(i), blk) for i, blk in enumerate(ml)]


def _tensor_key(x) -> tuple | None:
    return (x.data_ptr(), tuple(x.shape)) if isinstance(x, torch.Tensor) else None


def chained_blocks(model: nn.Module, batch: Any) -> list[tuple[str, nn.Module]]:
    """find_blocks(model) if, on `batch`, each block runs once, in order, on the previous block's output (what the
    block-by-block runner assumes when it feeds block i's outputs to block i + 1); [] otherwise. A ModuleList of
    parallel branches (per-field embeddings, heads reading one trunk) is not a chain: calibrated as a chain, each
    branch would see its neighbour's output (a crash, or silently wrong statistics)."""
    blocks = find_blocks(model)
    if not blocks:
        return []
    calls: list[list] = []  # [block index, key of its input, key of its first output]

    def pre(i):
        def hook(_m, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()), None)
            calls.append([i, _tensor_key(x), None])
        return hook

    def post(_m, _args, _kwargs, out):
        calls[-1][2] = _tensor_key(_first(out))

    hooks = [h for i, (_, b) in enumerate(blocks)
             for h in (b.register_forward_pre_hook(pre(i), with_kwargs=True),
                       b.register_forward_hook(post, with_kwargs=True))]
    try:
        with evaluating(model), torch.inference_mode():
            call_model(model, batch)
    finally:
        for h in hooks:
            h.remove()
    ok = [c[0] for c in calls] == list(range(len(blocks))) and all(
        a[2] is not None and b[1] == a[2] for a, b in zip(calls, calls[1:]))
    return blocks if ok else []


def _detach(x):
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, tuple):
        return tuple(_detach(v) for v in x)
    if isinstance(x, list):
        return [_detach(v) for v in x]
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    return x


def _is_cache(v: Any) -> bool:
    return type(v).__name__.endswith("Cache")


def _no_cache(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Drop key/value caches from captured arguments (each block is re-run many times, and a cache would grow with
    every run): keyword ones, and positional ones (GPT-2 passes its DynamicCache to each block by position)."""
    out = {k: None if _is_cache(v) else v for k, v in kwargs.items()}
    if "use_cache" in out:
        out["use_cache"] = False
    return tuple(None if _is_cache(a) else a for a in args), out


def capture_block_inputs(model: nn.Module, block: nn.Module, calib: Iterable[Any]) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of `block` for every calibration input; the forward stops at the block."""
    inputs: list[tuple[tuple, dict]] = []

    def hook(_m, args, kwargs):
        inputs.append(_no_cache(_detach(args), _detach(kwargs)))
        raise _Stop

    h = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            for batch in calib:
                try:
                    call_model(model, batch)
                except _Stop:
                    pass
    finally:
        h.remove()
    if not inputs:
        raise ValueError("the calibration data is empty (or never reaches the model's blocks)")
    return inputs


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _block_outputs(block: nn.Module, inputs):
    """Next block's inputs: this block's first output replaces the first positional argument."""
    nxt = []
    with torch.inference_mode():
        for args, kwargs in inputs:
            out = _first(block(*args, **kwargs))
            if args:
                nxt.append(((out,) + tuple(args[1:]), kwargs))
            else:  # hidden states passed by keyword
                key = next(iter(kwargs))
                nxt.append(((), {**kwargs, key: out}))
    return nxt


def sequential_layers(root: nn.Module, run: Callable[[], None], names: list[str],
                      process: Callable[[str, nn.Module, list[torch.Tensor]], None]) -> None:
    """Process the layers `names` (submodule names of `root`) in execution order.

    `run()` pushes all calibration inputs through `root`. Each round runs it once with hooks on the layers
    still to do; the first of them to execute, and every other one that received the very same input tensor
    (e.g. q/k/v projections), are handed to `process(name, module, inputs)` with their inputs (one tensor per
    run), which may quantize them in place. Later layers then see inputs computed by the processed ones.
    Layers that never execute are not processed.
    """
    todo = list(names)
    while todo:
        lead: list[str] = []  # the first of the remaining layers to execute
        seen: dict[str, list[torch.Tensor]] = {n: [] for n in todo}
        ran: set[str] = set()
        hooks = []
        for n in todo:
            def hook(_m, args, n=n):
                x = args[0].detach()
                ran.add(n)
                if not lead:
                    lead.append(n)
                # keep only the lead layer's inputs and those of layers fed the very same tensor
                if n == lead[0] or (seen[lead[0]] and x.data_ptr() == seen[lead[0]][-1].data_ptr()
                                    and x.shape == seen[lead[0]][-1].shape):
                    seen[n].append(x)
            hooks.append(root.get_submodule(n).register_forward_pre_hook(hook))
        try:
            with torch.inference_mode():
                run()
        finally:
            for h in hooks:
                h.remove()
        if not lead:
            return  # the rest never run on the calibration data: left unprocessed, for the caller to handle
        group = [n for n in todo if n in ran and len(seen[n]) == len(seen[lead[0]])]
        for n in group:
            process(n, root.get_submodule(n), seen.pop(n))
        todo = [n for n in todo if n not in group]


def check_finite(name: str, inputs: list[torch.Tensor], masks: list[torch.Tensor | None]) -> None:
    """Refuse NaN / infinite values in layer `name`'s calibration inputs (padded tokens apart): statistics taken
    from them (norms, Hessians, scales) would be NaN and decide the weights arbitrarily."""
    for i, x in enumerate(by_token(inputs, masks)):
        if torch.is_floating_point(x) and not torch.isfinite(x).all():
            where = f"calibration batch {i}" if len(inputs) == len(masks) else f"call {i}"
            raise ValueError(f"layer {name!r}: its calibration inputs contain NaN or infinite values ({where}); "
                             "check the calibration data (or, if it is finite, the layers before this one)")


def run_sequential(model: nn.Module, calib: Iterable[Any], names: list[str],
                   process: Callable[[str, nn.Module, list[torch.Tensor]], None],
                   progress: Callable[[str, int, int], None] | None = None, blockwise: bool = True) -> dict[str, int]:
    """Process layers `names` of `model` in execution order, one block at a time where the model has blocks.
    A layer whose inputs hold NaN or infinite values (padded tokens apart) is refused before `process` sees it.

    Returns statistics: `blocks` processed and `peak_inputs_bytes`, the largest amount of captured block inputs
    held at once (one block's worth, whatever the number of blocks)."""
    calib = list(calib) if calib is not None else []
    if not calib:
        raise ValueError("this method needs calibration data: calib is empty")
    with evaluating(model):  # inference behaviour; a model left in training mode keeps its BatchNorm statistics
        return _sequential(model, calib, names, process, progress, blockwise)


def _sequential(model, calib, names, process, progress, blockwise) -> dict[str, int]:
    masks, inner_process = layer_masks(model, calib), process

    def process(name: str, module: nn.Module, inputs: list[torch.Tensor]) -> None:
        check_finite(name, inputs, masks(name))
        inner_process(name, module, inputs)

    stats = {"blocks": 0, "peak_inputs_bytes": 0}
    blocks = chained_blocks(model, calib[0]) if blockwise else []
    remaining = list(names)
    done = 0
    if blocks:
        inputs = capture_block_inputs(model, blocks[0][1], calib)
        for bname, block in blocks:
            stats["peak_inputs_bytes"] = max(stats["peak_inputs_bytes"], _nbytes(inputs))
            inner = [n for n in remaining if n.startswith(bname + ".")]
            if inner:
                def run_block(block=block, inputs=inputs):
                    for args, kwargs in inputs:
                        block(*args, **kwargs)
                sequential_layers(block, run_block, [n[len(bname) + 1:] for n in inner],
                                  lambda n, m, xs, p=bname: process(f"{p}.{n}", m, xs))
                remaining = [n for n in remaining if n not in inner]
                done += len(inner)
                if progress:
                    progress("calibrate", done, len(names))
            inputs = _block_outputs(block, inputs)
            stats["blocks"] += 1
        del inputs
    if remaining:  # layers outside the blocks (embeddings, heads) or a model without blocks: whole passes
        def run_model():
            for batch in calib:
                call_model(model, batch)

        def proc(n, m, xs):
            nonlocal done
            process(n, m, xs)
            done += 1
            if progress:
                progress("calibrate", done, len(names))
        sequential_layers(model, run_model, remaining, proc)
    return stats


def _nbytes(inputs) -> int:
    total = 0
    for args, kwargs in inputs:
        for v in list(args) + list(kwargs.values()):
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total
