"""`ctr`: a DLRM-style click-through model on synthetic click logs whose embedding tables dominate its size.

The logs are generated from a fixed seed: F categorical fields whose values follow Zipf-like frequencies
(ids randomly permuted, so frequent ids are not the small ones) and D dense fields (normal and
log-normal). Clicks are Bernoulli draws from a hidden model: a bias per categorical value,
factorisation-machine pairwise interactions between the fields' hidden vectors and a small random
network on the dense fields. The model has one EmbeddingBag per field, a bottom MLP on the dense
fields, pairwise dot-product interactions and a top MLP that returns the click logit.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from modelpress.zoo import ZooEntry, default_cache_dir
from modelpress.zoo._cache import cached_model, deterministic

VERSION = 1
NAME = "ctr"


@dataclass(frozen=True)
class CTRConfig:
    cardinalities: tuple[int, ...] = (50_000, 30_000, 20_000, 10_000, 5_000, 2_000, 1_000, 1_000)
    n_dense: int = 8
    dim: int = 16  # embedding width, also the bottom MLP's output width
    bottom: tuple[int, ...] = (64,)  # hidden widths of the bottom MLP
    top: tuple[int, ...] = (64, 32)  # hidden widths of the top MLP
    n_train: int = 500_000
    n_test: int = 20_000
    zipf: float = 1.1  # frequency of the value of rank r is proportional to r ** -zipf
    truth_dim: int = 4  # width of the hidden model's per-value vectors
    epochs: int = 1
    batch_size: int = 1024
    lr: float = 3e-3
    seed: int = 0

    @classmethod
    def preset(cls, tiny: bool = False) -> "CTRConfig":
        if not tiny:
            return cls()
        return cls(cardinalities=(400, 200, 100, 50), dim=8, bottom=(16,), top=(16,),
                   n_train=8_000, n_test=2_000, epochs=2, batch_size=256, lr=1e-2)


class Split(NamedTuple):
    dense: torch.Tensor  # float32 [N, D]
    sparse: torch.Tensor  # int64 [N, F]
    clicks: torch.Tensor  # float32 [N] in {0, 1}
    p_true: torch.Tensor  # float32 [N], the hidden model's click probability (the Bayes-optimal score)


class HiddenModel(NamedTuple):
    """The ground truth the clicks are drawn from; per field f: ids[f][rank] is the value of that frequency rank."""

    ids: list[torch.Tensor]  # int64 [card] each, a random permutation
    bias: list[torch.Tensor]  # [card] each, the value's own effect on the logit
    vecs: list[torch.Tensor]  # [card, truth_dim] each, for the pairwise (FM) interactions
    pair_w: torch.Tensor  # [F, F], upper triangle used
    w1: torch.Tensor  # [D, 16] and w2 [16]: a small random network on the dense fields
    w2: torch.Tensor


STREAMS = {"train": 1, "test": 2, "calib": 3}  # each part has its own random stream: sizes do not interact


def hidden_model(cfg: CTRConfig) -> HiddenModel:
    g = torch.Generator().manual_seed(4 * cfg.seed)
    nf, k = len(cfg.cardinalities), cfg.truth_dim
    ids = [torch.randperm(card, generator=g) for card in cfg.cardinalities]
    bias = [0.5 * torch.randn(card, generator=g) for card in cfg.cardinalities]
    vecs = [torch.randn(card, k, generator=g) / k**0.5 for card in cfg.cardinalities]
    pair_w = torch.randn(nf, nf, generator=g).triu(1)
    w1 = torch.randn(cfg.n_dense, 16, generator=g) / cfg.n_dense**0.5
    return HiddenModel(ids, bias, vecs, pair_w, w1, torch.randn(16, generator=g) / 4)


def sample(cfg: CTRConfig, truth: HiddenModel, part: str, n: int) -> Split:
    """`n` click-log rows of the stream `part` ("train", "test" or "calib"), identical for the same config."""
    g = torch.Generator().manual_seed(4 * cfg.seed + STREAMS[part])
    ranks = [torch.multinomial(torch.arange(1, c + 1, dtype=torch.float64).pow(-cfg.zipf), n, replacement=True,
                               generator=g) for c in cfg.cardinalities]
    half = cfg.n_dense // 2
    normal = torch.randn(n, half, generator=g)
    log_count = torch.randn(n, cfg.n_dense - half, generator=g).exp().log1p()  # log(1 + log-normal count)
    dense = torch.cat([normal, log_count], dim=1)

    logit = torch.full((n,), -1.5) + torch.tanh(dense @ truth.w1) @ truth.w2
    vecs = [v[r] for v, r in zip(truth.vecs, ranks)]
    logit += sum(b[r] for b, r in zip(truth.bias, ranks))
    for a in range(len(vecs)):
        for b in range(a + 1, len(vecs)):
            logit += truth.pair_w[a, b] * (vecs[a] * vecs[b]).sum(1)
    logit += 0.5 * (vecs[0] * dense[:, : cfg.truth_dim]).sum(1)  # a dense x sparse interaction
    p_true = torch.sigmoid(logit)
    sparse = torch.stack([ids[r] for ids, r in zip(truth.ids, ranks)], dim=1)
    return Split(dense, sparse, torch.bernoulli(p_true, generator=g), p_true)


def generate(cfg: CTRConfig) -> tuple[Split, Split]:
    """(train, test) click logs, identical for the same config."""
    truth = hidden_model(cfg)
    return sample(cfg, truth, "train", cfg.n_train), sample(cfg, truth, "test", cfg.n_test)


def _mlp(widths: list[int], last_relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b))
        if last_relu or i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class CTRModel(nn.Module):
    """forward(dense [N, D], sparse int64 [N, F]) -> click logits [N]."""

    def __init__(self, cardinalities, n_dense: int, dim: int, bottom=(64,), top=(64, 32)):
        super().__init__()
        self.embeddings = nn.ModuleList(nn.EmbeddingBag(c, dim, mode="sum") for c in cardinalities)
        for emb in self.embeddings:
            nn.init.normal_(emb.weight, std=0.05)
        self.bottom = _mlp([n_dense, *bottom, dim], last_relu=True)
        n_vec = len(self.embeddings) + 1
        self.top = _mlp([dim + n_vec * (n_vec - 1) // 2, *top, 1], last_relu=False)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        x = self.bottom(dense)
        offsets = torch.arange(sparse.shape[0], device=sparse.device)  # one index per bag
        vecs = [x] + [emb(sparse[:, f].contiguous(), offsets) for f, emb in enumerate(self.embeddings)]
        t = torch.stack(vecs, dim=1)  # [N, F + 1, dim]
        i, j = torch.triu_indices(t.shape[1], t.shape[1], offset=1, device=t.device)
        pairs = torch.bmm(t, t.transpose(1, 2))[:, i, j]  # [N, (F + 1) F / 2]
        return self.top(torch.cat([x, pairs], dim=1)).squeeze(1)


def make_model(cfg: CTRConfig) -> CTRModel:
    """A freshly initialised model; the same weights for the same config, whatever the caller's RNG."""
    with deterministic(cfg.seed):
        return CTRModel(cfg.cardinalities, cfg.n_dense, cfg.dim, cfg.bottom, cfg.top)


def train(model: nn.Module, data: Split, cfg: CTRConfig) -> None:
    """Adam on binary cross-entropy, shuffled by a seeded generator."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    model.train()
    for _ in range(cfg.epochs):
        for idx in torch.randperm(len(data.clicks), generator=gen).split(cfg.batch_size):
            loss = F.binary_cross_entropy_with_logits(model(data.dense[idx], data.sparse[idx]), data.clicks[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()


def get_model(tiny: bool = False, cache_dir: Path | None = None, rebuild: bool = False,
              train_data: Split | None = None) -> CTRModel:
    """The trained model, from `cache_dir/ctr[-tiny]/` when cached there, else trained (on `train_data`,
    generated when not given) and cached."""
    cfg = CTRConfig.preset(tiny)
    name = NAME + ("-tiny" if tiny else "")
    folder = Path(cache_dir if cache_dir is not None else default_cache_dir()) / name
    meta = {"name": name, "version": VERSION, "config": asdict(cfg)}

    def fit(model: nn.Module) -> None:
        data = train_data if train_data is not None else sample(cfg, hidden_model(cfg), "train", cfg.n_train)
        with deterministic(cfg.seed):
            train(model, data, cfg)

    return cached_model(folder, meta, lambda: make_model(cfg), fit, rebuild=rebuild)


def build(tiny: bool = False, cache_dir: Path | None = None, rebuild: bool = False) -> ZooEntry:
    """`ctr`: 8 EmbeddingBag tables (118k rows x 16) + small MLPs, about 1.9M parameters, >99% in the tables."""
    from modelpress.evaluate.tasks import CTRTask

    cfg = CTRConfig.preset(tiny)
    model = get_model(tiny=tiny, cache_dir=cache_dir, rebuild=rebuild)  # generates the training logs if it trains
    truth = hidden_model(cfg)
    calib, test = sample(cfg, truth, "calib", 8 * 256), sample(cfg, truth, "test", cfg.n_test)
    batch = 4096
    task = CTRTask(data=[((test.dense[i : i + batch], test.sparse[i : i + batch]), test.clicks[i : i + batch])
                         for i in range(0, len(test.clicks), batch)])
    rows = 64 * 1024 if not tiny else 8 * 256
    tr = sample(cfg, truth, "train", min(rows, cfg.n_train))  # rows of the training stream (never the test one)
    train = [((tr.dense[i : i + 1024], tr.sparse[i : i + 1024]), tr.clicks[i : i + 1024].bool())
             for i in range(0, len(tr.clicks), 1024)]
    return ZooEntry(name=NAME, model=model, calib=list(zip(calib.dense.split(256), calib.sparse.split(256))),
                    task=task, train=train, description=f"DLRM-style CTR model on synthetic power-law click logs "
                                           f"({len(test.clicks)} held-out rows)")
