"""`shakespeare-lm`: a small Hugging Face LlamaForCausalLM trained here on the Shakespeare corpus.

The model and its byte-level BPE tokenizer live in a local Hugging Face folder,
`cache_dir/shakespeare-lm/` (`-tiny` for the test-sized model), written atomically and reloaded
with `local_files_only=True`. A missing or unreadable folder is rebuilt from scratch, with fixed
seeds and a fixed number of steps, so the same code gives the same weights on the same machine
(unless the wall-clock guard MODELPRESS_ZOO_MAX_SECONDS stops training early). The folder's
`modelpress_zoo.json` records the config, steps done, held-out perplexity and training time.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from modelpress.evaluate.lm import perplexity
from modelpress.evaluate.tasks import LanguageModelTask
from modelpress.zoo import ZooEntry, corpus, default_cache_dir
from modelpress.zoo._hf import quiet

NAME = "shakespeare-lm"
EOS = "<|endoftext|>"
MANIFEST = "modelpress_zoo.json"
FORMAT_VERSION = 1

# Linear in/out features are multiples of 128 (full) or 32 (tiny) so group quantization applies.
CONFIGS = {
    "full": dict(vocab=2048, hidden=256, layers=4, heads=4, intermediate=768, seq=128, steps=400, batch=16,
                 lr=2e-3, warmup=25, train_chars=None, eval_seqs=256, calib=(8, 4), mc_items=100),
    "tiny": dict(vocab=512, hidden=64, layers=2, heads=2, intermediate=128, seq=64, steps=40, batch=8,
                 lr=5e-3, warmup=4, train_chars=400_000, eval_seqs=16, calib=(2, 2), mc_items=20),
}
MC_CONTEXT, MC_CONTINUATION, MC_CHOICES = 32, 8, 4
SEED = 0
DEFAULT_MAX_SECONDS = 1200  # a guard for slow machines; MODELPRESS_ZOO_MAX_SECONDS overrides it
CALIB_CHARS = 20_000


def model_dir(cache_dir: Path | str | None = None, tiny: bool = False) -> Path:
    return Path(cache_dir or default_cache_dir()) / (NAME + ("-tiny" if tiny else ""))


def load_tokenizer(cache_dir: Path | str | None = None, tiny: bool = False):
    """The tokenizer saved next to the model (build the model first)."""
    from transformers import AutoTokenizer

    with quiet():
        return AutoTokenizer.from_pretrained(str(model_dir(cache_dir, tiny)), local_files_only=True)


# --- tokenizer and data ------------------------------------------------------------------------

def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   unk_token=None, model_max_length=1 << 20)


def _train_texts(cfg: dict) -> list[str]:
    texts = corpus.texts("train")
    if cfg["train_chars"]:  # the same share of every document
        share = cfg["train_chars"] // len(texts)
        texts = [t[:share] for t in texts]
    return texts


def encode_docs(tokenizer, texts: list[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _stream(docs: list[list[int]], eos_id: int) -> torch.Tensor:
    out: list[int] = []
    for ids in docs:
        out.extend(ids)
        out.append(eos_id)
    return torch.tensor(out, dtype=torch.long)


def heldout_tokens(stream: torch.Tensor, seq: int, n_seqs: int) -> torch.Tensor:
    """[n_seqs, seq] non-overlapping windows spread evenly over the held-out token stream."""
    chunks = stream[: len(stream) // seq * seq].view(-1, seq)
    if n_seqs >= len(chunks):
        return chunks.clone()
    index = torch.linspace(0, len(chunks) - 1, n_seqs).round().long()
    return chunks[index].clone()


def mc_items(docs: list[list[int]], n: int, seed: int = SEED) -> list[tuple[list[int], list[list[int]], int]]:
    """Zero-shot multiple choice items (context ids, [choice ids] * 4, answer index): a context, its
    true continuation and 3 continuations from elsewhere in the held-out text, in a seeded order."""
    span = MC_CONTEXT + MC_CONTINUATION
    spots = [(d, p) for d, ids in enumerate(docs) for p in range(0, len(ids) - span, span)]
    if len(spots) < MC_CHOICES:
        raise ValueError("held-out text too short for multiple-choice items")
    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(spots), generator=g)[:n].tolist()
    items = []
    for i in picks:
        d, p = spots[i]
        context = docs[d][p : p + MC_CONTEXT]
        true = docs[d][p + MC_CONTEXT : p + span]
        choices = [true]
        while len(choices) < MC_CHOICES:
            dd, pp = spots[int(torch.randint(len(spots), (1,), generator=g))]
            cand = docs[dd][pp + MC_CONTEXT : pp + span]
            if (dd, pp) != (d, p) and cand not in choices:
                choices.append(cand)
        order = torch.randperm(MC_CHOICES, generator=g).tolist()
        items.append((context, [choices[k] for k in order], order.index(0)))
    return items


def calib_batches(stream: torch.Tensor, seq: int, n_batches: int, batch: int, seed: int = SEED) -> list[dict]:
    g = torch.Generator().manual_seed(seed + 1)
    starts = torch.randint(0, len(stream) - seq, (n_batches, batch), generator=g)
    return [{"input_ids": torch.stack([stream[s : s + seq] for s in row.tolist()])} for row in starts]


# --- model -------------------------------------------------------------------------------------

def make_model(cfg: dict, eos_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"], num_key_value_heads=cfg["heads"],
        max_position_embeddings=cfg["seq"], bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        tie_word_embeddings=False, use_cache=False,
    )
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config)


def train(model, stream: torch.Tensor, cfg: dict, log=None, max_seconds: float | None = None) -> int:
    """AdamW with linear warmup and cosine decay on random windows of the train stream; returns the
    steps done (all of them unless `max_seconds` ran out first, which makes the result machine-dependent)."""
    g = torch.Generator().manual_seed(SEED + 2)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=cfg["lr"], betas=(0.9, 0.95))
    steps, warmup, seq = cfg["steps"], cfg["warmup"], cfg["seq"]
    model.train()
    t0 = time.time()
    for step in range(steps):
        if max_seconds is not None and time.time() - t0 > max_seconds:
            if log:
                log(f"stopped after {step} of {steps} steps: the {max_seconds:.0f} s budget ran out")
            break
        lr = cfg["lr"] * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(stream) - seq - 1, (cfg["batch"],), generator=g).tolist()
        x = torch.stack([stream[s : s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log and (step % 100 == 0 or step == steps - 1):
            log(f"step {step}/{steps} loss {loss.item():.3f} lr {lr:.2e} {time.time() - t0:.0f} s")
    else:
        step = steps
    model.eval()
    return step


def heldout_batches(tokens: torch.Tensor, batch_size: int = 16) -> list[dict]:
    return [{"input_ids": tokens[i : i + batch_size]} for i in range(0, len(tokens), batch_size)]


# --- cache -------------------------------------------------------------------------------------

def _load(folder: Path, cfg: dict):
    """(model, tokenizer) from a complete cache folder, or None when missing or unreadable."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    try:
        meta = json.loads((folder / MANIFEST).read_text())
        if meta.get("format_version") != FORMAT_VERSION or meta.get("config") != json.loads(json.dumps(cfg)):
            return None
        with quiet():
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            model = LlamaForCausalLM.from_pretrained(str(folder), local_files_only=True)
    except Exception:  # missing, truncated or corrupt: rebuild
        return None
    # the forward pass returns no cache (training, calibration, evaluation: use_cache=False); generation keeps one
    # (one token per step; without it `generate` runs the whole sequence again at every step)
    model.generation_config.use_cache = True
    return model.eval(), tokenizer


def _build_folder(folder: Path, cfg: dict, log) -> None:
    """Train tokenizer and model in a temporary folder, then move it into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like any other folder
    try:
        t0 = time.time()
        texts = _train_texts(cfg)
        tokenizer = train_tokenizer(texts, cfg["vocab"])
        stream = _stream(encode_docs(tokenizer, texts), tokenizer.eos_token_id)
        model = make_model(cfg, tokenizer.eos_token_id)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"{folder.name}: {n_params:,} parameters, {len(stream):,} train tokens, {cfg['steps']} steps")
        budget = float(os.environ.get("MODELPRESS_ZOO_MAX_SECONDS", DEFAULT_MAX_SECONDS))
        done = train(model, stream, cfg, log, max_seconds=budget)
        held = _heldout(tokenizer, cfg)[0]
        ppl = perplexity(model, heldout_batches(held))
        with quiet():
            model.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
        meta = dict(format_version=FORMAT_VERSION, config=cfg, parameters=n_params, train_tokens=len(stream),
                    steps_done=done, heldout_perplexity=ppl, train_seconds=round(time.time() - t0, 1),
                    torch_threads=torch.get_num_threads())
        (tmp / MANIFEST).write_text(json.dumps(meta, indent=2))
        log(f"{folder.name}: held-out perplexity {ppl:.2f} after {meta['train_seconds']} s")
        old = tmp.with_name(tmp.name + ".old")
        if folder.exists():  # a corrupt or outdated build: move it aside, then swap
            os.rename(folder, old)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first; keep theirs
            if not (folder / MANIFEST).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(tmp.with_name(tmp.name + ".old"), ignore_errors=True)


def _heldout(tokenizer, cfg: dict) -> tuple[torch.Tensor, list[list[int]]]:
    docs = encode_docs(tokenizer, corpus.texts("heldout"))
    stream = _stream(docs, tokenizer.eos_token_id)
    return heldout_tokens(stream, cfg["seq"], cfg["eval_seqs"]), docs


def build(tiny: bool = False, cache_dir: Path | None = None, rebuild: bool = False, log=print) -> ZooEntry:
    """The trained model (eval mode), calibration batches and a LanguageModelTask on held-out text."""
    cfg = CONFIGS["tiny" if tiny else "full"]
    folder = model_dir(cache_dir, tiny)
    loaded = None if rebuild else _load(folder, cfg)
    if loaded is None:
        _build_folder(folder, cfg, log or (lambda msg: None))
        loaded = _load(folder, cfg)
        if loaded is None:
            raise RuntimeError(f"could not load the freshly built {folder}")
    model, tokenizer = loaded
    held, held_docs = _heldout(tokenizer, cfg)
    calib_texts = [t[:CALIB_CHARS] for t in _train_texts(cfg)]  # the head of every train document
    train_stream = _stream(encode_docs(tokenizer, calib_texts), tokenizer.eos_token_id)
    calib = calib_batches(train_stream, cfg["seq"], *cfg["calib"])
    train = train_batches(tokenizer, cfg)

    task = LanguageModelTask(data=heldout_batches(held), choices=mc_items(held_docs, cfg["mc_items"]))
    n_params = sum(p.numel() for p in model.parameters())
    desc = f"{'tiny ' if tiny else ''}LlamaForCausalLM ({n_params:,} params) trained on Shakespeare"
    return ZooEntry(name=NAME, model=model, calib=calib, task=task, description=desc, train=train)


def train_batches(tokenizer, cfg: dict, n_batches: int = 64, share: float = 0.25) -> list[tuple[dict, torch.Tensor]]:
    """(inputs, next-token targets) batches drawn from the first `share` of every train document (training
    and calibration text only; the held-out tail of each document is never used)."""
    texts = [t[: int(len(t) * share)] for t in _train_texts(cfg)]
    stream = _stream(encode_docs(tokenizer, texts), tokenizer.eos_token_id)
    seqs = calib_batches(stream, cfg["seq"] + 1, n_batches, cfg["batch"], seed=SEED + 7)
    return [({"input_ids": b["input_ids"][:, :-1]}, b["input_ids"][:, 1:]) for b in seqs]
