"""Training on CPU: the plain loop (`fit`) that recovery, QAT and distillation build on, standard losses,
quantization-aware training (`prepare_qat_` / `convert_`), distillation and the `train` recipe step."""
from .distill import DistillConfig, Distiller, attention_kd, distill_loss, feature_kd
from .loop import fit, match_teacher_loss, output_tensor, supervised_loss, task_loss
from .qat import QATConfig, abwr_penalty, convert_, prepare_qat_, set_observing

__all__ = ["fit", "task_loss", "supervised_loss", "match_teacher_loss", "output_tensor",
           "QATConfig", "prepare_qat_", "convert_", "set_observing", "abwr_penalty",
           "DistillConfig", "Distiller", "distill_loss", "feature_kd", "attention_kd"]
