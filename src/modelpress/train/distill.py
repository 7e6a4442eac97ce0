"""Knowledge distillation: output KD (temperature-scaled KL on logits, binary KL on click logits, or MSE / cosine
on embeddings), layer-wise feature KD (MSE between chosen student and teacher layer outputs, with a learned
projection where widths differ) and attention-map KD for Hugging Face transformers.

Plain functions (`distill_loss`, `attention_kd`, `feature_kd`) for any loop, and `Distiller`, which hooks a
student and its teacher: every student call also runs the teacher (no gradient) on the same inputs, so
`distiller.kd_loss(student_output)` is all a training loop adds. `distiller.loss(model, batch)` is a loss
function for `train.fit`; `distiller.trainer_loss` plugs into transformers' `Trainer(compute_loss_func=...)`.
"""
from __future__ import annotations

import math

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..calibrate import call_model
from .loop import output_tensor, task_loss

OUTPUT_LOSSES = ("auto", "kl", "binary", "mse", "cosine")


def logit_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over rows (all leading dimensions)."""
    c = student.shape[-1]
    s = F.log_softmax(student.reshape(-1, c).float() / temperature, -1)
    t = F.log_softmax(teacher.reshape(-1, c).float() / temperature, -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def binary_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(Bernoulli(sigmoid(teacher / T)) || Bernoulli(sigmoid(student / T))), averaged (click logits)."""
    s, t = student.reshape(-1).float() / temperature, teacher.reshape(-1).float() / temperature
    pt = torch.sigmoid(t)
    kl = pt * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - pt) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return kl.mean() * temperature**2


def distill_loss(student_out: Any, teacher_out: Any, temperature: float = 1.0, kind: str = "auto") -> torch.Tensor:
    """Output distillation loss between model outputs (tensors, or HF outputs: logits / last_hidden_state).

    kind: `kl` (class logits [..., C]), `binary` (click logits [N] or [N, 1]), `mse`, `cosine` (1 - cosine
    along the last dimension, for embeddings), `auto` (binary for one logit per row, else kl)."""
    s, t = output_tensor(student_out), output_tensor(teacher_out).detach()
    if s.shape != t.shape:
        raise ValueError(f"student output {tuple(s.shape)} and teacher output {tuple(t.shape)} differ in shape")
    if kind == "auto":
        kind = "binary" if s.dim() == 1 or s.shape[-1] == 1 else "kl"
    if kind == "kl":
        return logit_kd(s, t, temperature)
    if kind == "binary":
        return binary_kd(s, t, temperature)
    if kind == "mse":
        return F.mse_loss(s.float(), t.float())
    if kind == "cosine":
        return (1 - F.cosine_similarity(s.float(), t.float(), dim=-1)).mean()
    raise ValueError(f"unknown distillation loss {kind!r}; use one of {OUTPUT_LOSSES}")


def feature_kd(student: torch.Tensor, teacher: torch.Tensor, projection: nn.Module | None = None,
               channel_dim: int = -1) -> torch.Tensor:
    """MSE between a student feature (projected to the teacher's width along `channel_dim`) and the teacher's."""
    if projection is not None:
        student = projection(student.movedim(channel_dim, -1)).movedim(-1, channel_dim)
    if student.shape != teacher.shape:
        raise ValueError(f"student feature {tuple(student.shape)} does not match the teacher's {tuple(teacher.shape)}"
                         " (give the layers' widths a projection)")
    return F.mse_loss(student.float(), teacher.detach().float())


def attention_kd(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers, heads and query rows of KL(teacher attention row || student attention row)."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"attention KD pairs layers one to one: the student has {len(student)} attention maps, "
                         f"the teacher {len(teacher)}")
    terms = []
    for s, t in zip(student, teacher):
        s, t = s.float(), t.detach().float()
        if s.shape != t.shape:
            raise ValueError(f"attention maps differ in shape: {tuple(s.shape)} vs {tuple(t.shape)}")
        logs = torch.log(s.clamp(min=1e-12))
        kl = torch.where(t > 0, t * (torch.log(t.clamp(min=1e-12)) - logs), torch.zeros_like(t)).sum(-1)
        terms.append(kl.mean())
    return torch.stack(terms).mean()


@dataclass(frozen=True)
class DistillConfig:
    """Weights of the loss terms. task: the task loss on labelled batches; output: output KD (`output_loss`,
    `temperature`); feature: layer-wise KD over `layers` (student layer name -> teacher layer name);
    attention: attention-map KD (Hugging Face models inside student and teacher, paired in order)."""

    task: float = 1.0
    output: float = 0.0
    temperature: float = 1.0
    output_loss: str = "auto"
    feature: float = 0.0
    layers: Mapping[str, str] | None = None
    attention: float = 0.0

    def __post_init__(self):
        for name in ("task", "output", "feature", "attention"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):  # (NaN had dropped the term)
                raise ValueError(f"distillation weight {name!r} must be >= 0 and finite, got {getattr(self, name)}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be > 0 and finite, got {self.temperature}")
        if self.output_loss not in OUTPUT_LOSSES:
            raise ValueError(f"output_loss must be one of {OUTPUT_LOSSES}, got {self.output_loss!r}")
        if self.feature > 0 and not self.layers:
            raise ValueError("feature distillation needs `layers`: a mapping of student layer -> teacher layer")

    @property
    def needs_teacher(self) -> bool:
        return self.output > 0 or self.feature > 0 or self.attention > 0


_CHANNELS_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                   nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _agree(w: tuple, other: tuple) -> tuple[int, int]:
    """(dim, width) of one side; an ambiguous one (dim None: [N, C, L] with C == L) takes the other side's dim."""
    if w[0] is not None:
        return w[0], w[1]
    dim = other[0] if other[0] is not None else -1
    return dim, w[2][dim]


def _width(module: nn.Module, out: torch.Tensor) -> tuple:
    """(channel dimension, width) of a layer's output: where the module declares its width (_declared_width), the
    dimension of the output that has it; else dim 1 of an image-like output ([N, C, H, W, ...]) of a module holding
    convolutions / BatchNorm (a CNN block), the last dimension otherwise ([N, L, C]: a ViT patch embedding)."""
    if out.dim() <= 2:
        return -1, out.shape[-1]
    own = _declared_width(module)
    if own is not None:
        d, w = own
        for dim in ((1, -1) if d == 1 else (-1, 1)):
            if out.shape[dim] == w:
                return dim, w
    convs = [m for m in module.modules() if isinstance(m, _CHANNELS_FIRST)]
    if convs:  # a block holding convolutions: the dimension with its last one's channels ([N, C, L], [N, C, H, W];
        last = convs[-1]  # a patch embedding's [N, L, C] has them last)
        w = last.num_features if isinstance(last, nn.modules.batchnorm._BatchNorm) else last.out_channels
        if out.dim() == 3 and out.shape[1] == out.shape[-1] == w:  # [N, C, L] or [N, L, C]: the pair decides
            return None, w, tuple(out.shape)
        for dim in (1, -1):
            if out.shape[dim] == w:
                return dim, w
        if out.dim() >= 4:
            return 1, out.shape[1]
    return -1, out.shape[-1]


class Distiller(nn.Module):
    """Ties a student to its teacher for distillation. Submodules: the projections (trainable: give
    `distiller.parameters()` to the optimizer too). Use as a context manager or call `close()` when done."""

    def __init__(self, teacher: nn.Module, student: nn.Module, config: DistillConfig = DistillConfig(),
                 example: Any = None, labelled: bool | None = None):
        super().__init__()
        self.config, self.labelled = config, labelled
        self._teacher = [teacher.eval()]  # a list: not a submodule (its parameters are not trained)
        self._student = [student]
        self._hooks: list = []
        self._t_out: Any = None
        self._feats: dict[str, dict[str, torch.Tensor]] = {"s": {}, "t": {}}
        self._attn: dict[str, list[torch.Tensor]] = {"s": [], "t": []}
        self._restore_attn: list = []
        self.projections = nn.ModuleDict()
        self._dims: dict[str, int] = {}
        if config.needs_teacher:
            self._hooks.append(student.register_forward_pre_hook(self._run_teacher, with_kwargs=True))
        if config.feature > 0:
            self._hook_features(teacher, student, example)
        if config.attention > 0:
            self._hook_attention(teacher, "t")
            self._hook_attention(student, "s")

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def _run_teacher(self, module, args, kwargs):
        self._feats["t"].clear()
        self._attn["t"].clear()
        self._attn["s"].clear()
        with torch.no_grad():
            self._t_out = self.teacher(*args, **kwargs)

    def _hook_features(self, teacher, student, example):
        seen: dict[tuple[str, str], tuple[int, int]] = {}
        for key, model, names in (("s", student, list(self.config.layers)),
                                  ("t", teacher, list(self.config.layers.values()))):
            for name in names:
                try:
                    m = model.get_submodule(name)
                except AttributeError:
                    raise ValueError(f"the {'student' if key == 's' else 'teacher'} has no layer {name!r}") from None
                self._hooks.append(m.register_forward_hook(self._capture(key, name, m, seen)))
        if example is not None:
            self._probe(example)
        for s_name, t_name in self.config.layers.items():
            ws = seen.get(("s", s_name)) or _declared_width(student.get_submodule(s_name))
            wt = seen.get(("t", t_name)) or _declared_width(teacher.get_submodule(t_name))
            if ws is None or wt is None:
                raise ValueError(f"cannot tell the output widths of {s_name!r} / {t_name!r}: pass example=")
            ws, wt = _agree(ws, wt), _agree(wt, ws)  # a side whose shape could be read both ways follows the other
            self._dims[s_name] = ws[0]
            if ws[1] != wt[1]:
                self.projections[_key(s_name)] = nn.Linear(ws[1], wt[1], bias=False)

    def _capture(self, key, name, module, seen):
        def hook(m, args, out):
            t = output_tensor(out)
            if (key, name) not in seen:  # (once: _width walks the module)
                seen[(key, name)] = _width(module, t)
            self._feats[key][name] = t
        return hook

    def _probe(self, example):
        with torch.no_grad():
            call_model(self._student[0], example)
            call_model(self.teacher, example)

    def _hook_attention(self, model: nn.Module, key: str):
        from transformers import PreTrainedModel

        found = 0
        for top in [m for m in model.modules() if isinstance(m, PreTrainedModel)][:1]:
            rec = getattr(top, "_can_record_outputs", None) or {}
            target = rec.get("attentions")
            target = getattr(target, "target_class", target)
            if target is None:
                continue
            self._restore_attn.append((top, top.config._attn_implementation))
            top.set_attn_implementation("eager")  # sdpa does not return attention weights
            for m in top.modules():
                if isinstance(m, target):
                    self._hooks.append(m.register_forward_hook(
                        lambda _m, _a, out, k=key: self._attn[k].append(out[1])))
                    found += 1
        if not found:
            raise ValueError("attention distillation needs Hugging Face transformer models (no attention layers found)")

    def kd_loss(self, student_out: Any) -> torch.Tensor:
        """Weighted output + feature + attention distillation terms for the student call just made."""
        c = self.config
        total = torch.zeros(())
        if c.needs_teacher and self._t_out is None:
            raise RuntimeError("the teacher did not run: call the student (hooked by this Distiller) first")
        if c.output > 0:
            total = total + c.output * distill_loss(student_out, self._t_out, c.temperature, c.output_loss)
        if c.feature > 0:
            terms = []
            for s_name, t_name in c.layers.items():
                s, t = self._feats["s"].get(s_name), self._feats["t"].get(t_name)
                if s is None or t is None:
                    raise RuntimeError(f"layer {s_name!r} or {t_name!r} did not run in this forward pass")
                terms.append(feature_kd(s, t, self.projections[_key(s_name)] if _key(s_name) in self.projections
                                        else None, self._dims[s_name]))
            total = total + c.feature * torch.stack(terms).mean()
        if c.attention > 0:
            total = total + c.attention * attention_kd(self._attn["s"], self._attn["t"])
        return total

    def split(self, batch: Any) -> tuple[Any, Any]:
        """(input, target or None): a pair is (input, target) unless labelled=False; anything else is input."""
        if self.labelled is not False and isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        if self.labelled:
            raise ValueError("labelled batches must be (input, target) pairs")
        return batch, None

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Task loss (on labelled batches, weight `task`) plus the distillation terms: a `fit` loss function."""
        x, y = self.split(batch)
        out = call_model(model, x)
        total = self.kd_loss(out)
        if y is not None and self.config.task > 0:
            total = total + self.config.task * task_loss(output_tensor(out), y)
        return total

    def trainer_loss(self, outputs: Any, labels: Any = None, num_items_in_batch: Any = None) -> torch.Tensor:
        """For transformers' Trainer(compute_loss_func=...): task cross-entropy on the logits (ignoring label
        -100; causal LMs: pass labels already shifted, or use task=0) plus the distillation terms."""
        total = self.kd_loss(outputs)
        if labels is not None and self.config.task > 0:
            logits = output_tensor(outputs)
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1).long(),
                                 ignore_index=-100)
            total = total + self.config.task * ce
        return total

    def close(self) -> None:
        """Remove the hooks and restore the attention implementation."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for top, impl in reversed(self._restore_attn):  # reverse: teacher and student may share a config
            top.set_attn_implementation(impl)
        self._restore_attn.clear()
        self._t_out = None

    def __enter__(self) -> "Distiller":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _declared_width(m: nn.Module) -> tuple[int, int] | None:
    """(channel dimension, width) from the module's own attributes (a convolution's or BatchNorm's channels, a
    Linear's out_features, an embedding's dimension), or for an nn.Sequential those of its last element that
    declares one (conv, BatchNorm, ReLU: the BatchNorm's). Other modules (blocks with their own forward) declare
    none: their output is seen on a probe run (example=)."""
    if isinstance(m, _CHANNELS_FIRST):
        return 1, m.num_features if isinstance(m, nn.modules.batchnorm._BatchNorm) else m.out_channels
    for attr in ("out_features", "embedding_dim"):
        if isinstance(getattr(m, attr, None), int):
            return -1, getattr(m, attr)
    if isinstance(m, nn.Sequential):
        for c in reversed(m):
            w = _declared_width(c)
            if w is not None:
                return w
            if any(True for _ in c.parameters()):  # a layer with weights but no declared width: unknown
                return None
    return None


def _key(name: str) -> str:
    return name.replace(".", "__") or "_"


__all__ = ["DistillConfig", "Distiller", "distill_loss", "logit_kd", "binary_kd", "feature_kd", "attention_kd"]
