"""`digits-cnn` and `digits-dwcnn`: small BatchNorm CNNs on scikit-learn's bundled 8x8 digits (offline).

The data is `sklearn.datasets.load_digits` scaled to [0, 1], split 70/30 stratified with seed 0. The
models are Conv2d+BatchNorm2d+ReLU blocks (plain 3x3, or depthwise 3x3 + pointwise 1x1), global
average pooling and one Linear layer; training is seeded, single-threaded and deterministic.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from modelpress.zoo import ZooEntry, default_cache_dir
from modelpress.zoo._cache import cached_model, deterministic

VERSION = 1
KINDS = {"cnn": "digits-cnn", "dwcnn": "digits-dwcnn"}


@dataclass(frozen=True)
class DigitsConfig:
    kind: str = "cnn"  # "cnn" | "dwcnn"
    width: int = 16  # channels of the first block; later blocks widen it
    epochs: int = 15
    batch_size: int = 64
    lr: float = 3e-3
    max_steps: int = 0  # stop after this many steps when > 0 (tiny builds)
    augment: bool = True  # random shifts of up to one pixel
    seed: int = 0

    @classmethod
    def preset(cls, kind: str, tiny: bool = False) -> "DigitsConfig":
        if kind not in KINDS:
            raise ValueError(f"unknown digits model kind {kind!r}; expected one of {sorted(KINDS)}")
        return cls(kind=kind, width=8, epochs=3, max_steps=60, lr=1e-2) if tiny else cls(kind=kind)


def load_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): images as float32 [N, 1, 8, 8] in [0, 1], labels as int64 [N]."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the digits zoo models need scikit-learn: pip install 'modelpress[eval]'") from exc
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(range(len(y)), test_size=0.3, stratify=data.target, random_state=seed)
    train_idx, test_idx = torch.tensor(train_idx), torch.tensor(test_idx)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3, groups: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU())


def _dw_separable(cin: int, cout: int) -> list[nn.Module]:
    return [_conv_bn_relu(cin, cin, 3, groups=cin), _conv_bn_relu(cin, cout, 1)]


class DigitsNet(nn.Module):
    """features (conv blocks) -> global average pool -> Linear(·, 10)."""

    def __init__(self, kind: str = "cnn", width: int = 16):
        super().__init__()
        w = width
        if kind == "cnn":
            blocks = [_conv_bn_relu(1, w), _conv_bn_relu(w, 2 * w), nn.MaxPool2d(2),
                      _conv_bn_relu(2 * w, 4 * w), _conv_bn_relu(4 * w, 4 * w)]
            out = 4 * w
        elif kind == "dwcnn":
            blocks = [_conv_bn_relu(1, 2 * w), *_dw_separable(2 * w, 4 * w), nn.MaxPool2d(2),
                      *_dw_separable(4 * w, 8 * w), *_dw_separable(8 * w, 8 * w)]
            out = 8 * w
        else:
            raise ValueError(f"unknown digits model kind {kind!r}")
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(out, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def make_model(cfg: DigitsConfig) -> DigitsNet:
    """A freshly initialised model; the same weights for the same config, whatever the caller's RNG."""
    with deterministic(cfg.seed):
        return DigitsNet(cfg.kind, cfg.width)


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by -1, 0 or +1 pixels in each direction, filling with zeros."""
    n, _, h, w = x.shape
    dy, dx = torch.randint(0, 3, (2, n), generator=gen)
    rows = (torch.arange(h)[None, :] + dy[:, None])[:, :, None]
    cols = (torch.arange(w)[None, :] + dx[:, None])[:, None, :]
    return F.pad(x, (1, 1, 1, 1))[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: DigitsConfig) -> None:
    """Adam, one-cycle schedule (warm-up, cosine decay), cross-entropy; shuffles and shifts from a seeded generator."""
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = -(-len(y) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.15)
    model.train()
    step = 0
    while step < total:
        for idx in torch.randperm(len(y), generator=gen).split(cfg.batch_size):
            xb = _shift(x[idx], gen) if cfg.augment else x[idx]
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step == total:
                break
    model.eval()


def get_model(kind: str = "cnn", tiny: bool = False, cache_dir: Path | None = None, rebuild: bool = False,
              split: tuple[torch.Tensor, ...] | None = None) -> DigitsNet:
    """The trained model, from `cache_dir/<name>[-tiny]/` when cached there, else trained and cached."""
    cfg = DigitsConfig.preset(kind, tiny)
    name = KINDS[kind] + ("-tiny" if tiny else "")
    folder = Path(cache_dir if cache_dir is not None else default_cache_dir()) / name
    meta = {"name": name, "version": VERSION, "config": asdict(cfg)}

    def fit(model: nn.Module) -> None:
        x_train, y_train = (split if split is not None else load_split(cfg.seed))[:2]
        with deterministic(cfg.seed):
            train(model, x_train, y_train, cfg)

    return cached_model(folder, meta, lambda: make_model(cfg), fit, rebuild=rebuild)


def _build(kind: str, tiny: bool, cache_dir: Path | None, rebuild: bool) -> ZooEntry:
    from modelpress.evaluate.tasks import ClassificationTask

    split = load_split()
    x_train, y_train, x_test, y_test = split
    model = get_model(kind, tiny=tiny, cache_dir=cache_dir, rebuild=rebuild, split=split)
    calib = list(x_train[: 8 * 32].split(32))
    return ZooEntry(name=KINDS[kind], model=model, calib=calib,
                    train=list(zip(x_train.split(64), y_train.split(64))),
                    task=ClassificationTask(data=list(zip(x_test.split(256), y_test.split(256)))),
                    description=f"{'depthwise-separable ' if kind == 'dwcnn' else ''}BatchNorm CNN "
                                f"on scikit-learn's 8x8 digits ({len(y_test)} held-out images)")


def build_cnn(tiny: bool = False, cache_dir: Path | None = None, rebuild: bool = False) -> ZooEntry:
    """`digits-cnn`: four Conv2d+BatchNorm2d+ReLU blocks (16-32-64-64 channels), about 61k parameters."""
    return _build("cnn", tiny, cache_dir, rebuild)


def build_dwcnn(tiny: bool = False, cache_dir: Path | None = None, rebuild: bool = False) -> ZooEntry:
    """`digits-dwcnn`: a 3x3 stem, then depthwise 3x3 + pointwise 1x1 blocks (32-64-128-128), about 31k parameters."""
    return _build("dwcnn", tiny, cache_dir, rebuild)
