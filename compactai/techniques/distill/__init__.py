"""The distill family: knowledge distillation into smaller students (``Distill``, registered as
``distill``). Losses, student builders, objectives and the trainer live in their own modules."""

from compactai.techniques.distill.students import STUDENT_BUILDERS, parse_student_spec, register_student
from compactai.techniques.distill.technique import Distill
from compactai.techniques.distill.trainer import TrainConfig, Trainer

__all__ = ["STUDENT_BUILDERS", "Distill", "TrainConfig", "Trainer", "parse_student_spec", "register_student"]
