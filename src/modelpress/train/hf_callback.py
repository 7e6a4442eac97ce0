"""QAT and distillation inside transformers' `Trainer` (needs `pip install 'modelpress[train]'`: transformers and
accelerate).

    mp.prepare_qat_(model, mp.QuantConfig(weights="int4:g32"))          # before building the Trainer
    distiller = mp.Distiller(teacher, model, mp.DistillConfig(output=1.0, temperature=2.0))
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      compute_loss_func=distiller.trainer_loss,         # task + distillation terms
                      callbacks=[ModelpressCallback(distiller, freeze_ranges_after=500)])
    trainer.train()                                                     # ends with convert_(model)
"""
from __future__ import annotations

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("the Trainer callback needs transformers and accelerate: pip install 'modelpress[train]'") from e

from .qat import convert_, qat_layers, set_observing


class ModelpressCallback(TrainerCallback):
    """Freezes activation ranges after `freeze_ranges_after` steps, and at the end of training removes the
    distiller's hooks and converts QAT layers to packed ones (`convert=True`)."""

    def __init__(self, distiller=None, freeze_ranges_after: int | None = None, convert: bool = True):
        self.distiller, self.freeze_ranges_after, self.convert = distiller, freeze_ranges_after, convert

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None and self.freeze_ranges_after is not None and state.global_step == self.freeze_ranges_after:
            set_observing(model, False)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.distiller is not None:
            self.distiller.close()
        if model is not None and self.convert and qat_layers(model):
            convert_(model)
        return control
