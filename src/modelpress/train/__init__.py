"""Training on CPU: the plain loop (`fit`) that recovery, QAT and distillation build on, and standard losses."""
from .loop import fit, match_teacher_loss, output_tensor, supervised_loss, task_loss

__all__ = ["fit", "task_loss", "supervised_loss", "match_teacher_loss", "output_tensor"]
