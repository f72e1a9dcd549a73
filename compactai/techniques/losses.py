"""The losses techniques train with when a teacher is at hand: soft-target KL for classifiers,
cosine/MSE on mean-pooled embeddings and masked token-state MSE for encoders, and the masked
mean pooling itself. Distillation and pruning's fine-tuning (and its taylor criterion) use these,
so a loss is written once.

Each loss is a plain function of tensors, so it can be checked against hand-computed values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EMBEDDING_LOSSES = ("cosine", "mse", "cosine+mse")


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher_T || student_T) * T^2 (Hinton et al.), averaged over the batch.

    The T^2 factor keeps the gradient scale independent of the temperature."""
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2


def logit_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """alpha * soft-target KL + (1 - alpha) * hard-label cross-entropy.

    ``labels`` are class indices, or class probabilities (e.g. blended one-hot labels of mixup).
    alpha = 1 is pure distillation (no labels needed); alpha = 0 is training on labels alone."""
    loss = student_logits.new_zeros(())
    if alpha > 0:
        loss = loss + alpha * soft_target_loss(student_logits, teacher_logits, temperature)
    if alpha < 1:
        if labels is None:
            raise ValueError("Hard-label cross-entropy needs labels; use alpha=1 on unlabeled data.")
        loss = loss + (1 - alpha) * F.cross_entropy(student_logits, labels)
    return loss


def masked_mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of token vectors over the attention mask (sentence-transformers pooling); 2-D input
    is already pooled and returned as is."""
    if hidden.dim() == 2:
        return hidden
    if attention_mask is None:
        return hidden.mean(dim=1)
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine+mse") -> torch.Tensor:
    """Loss between pooled student and teacher embeddings (batch x width).

    ``cosine`` is mean(1 - cos), ``mse`` the mean squared error per element, ``cosine+mse`` their sum."""
    if kind not in EMBEDDING_LOSSES:
        raise ValueError(f"Unknown embedding loss '{kind}'; choose one of {', '.join(EMBEDDING_LOSSES)}.")
    loss = student.new_zeros(())
    if "cosine" in kind:
        loss = loss + (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    if "mse" in kind:
        loss = loss + F.mse_loss(student, teacher)
    return loss


def hidden_state_loss(student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """MSE between token states (batch x seq x width), counting only real (unmasked) tokens."""
    squared = (student - teacher).pow(2).mean(dim=-1)
    if attention_mask is None:
        return squared.mean()
    mask = attention_mask.to(squared.dtype)
    return (squared * mask).sum() / mask.sum().clamp_min(1.0)
