"""Information Self-Distillation (ISD) losses of KIF-ISD: a student learns from a frozen teacher of the same design.

    L = L_lm + 4 * L_cls + 0.01 * L_kd + 1 * L_rel

- `kd_loss`: soft-label distillation of the decoder's next-token distributions, T^2 * KL(teacher_T || student_T), over
  the report tokens only (the original also counted the diagnosis prompt and the padding).
- `relational_loss`: relational distillation of how the images of a batch relate to each other, through the image
  patch features and the diagnosis classifier (the original hard-coded a batch of 16; this works for any batch).

Training-only code: the model files never import it.
"""

import torch
import torch.nn.functional as F


IGNORE_INDEX = -100
# Hinton et al.'s temperature as used by KIF-ISD.
DEFAULT_TEMPERATURE = 4.0


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.LongTensor,
    temperature: float = DEFAULT_TEMPERATURE,
) -> torch.Tensor:
    """Knowledge-distillation loss of the next-token distributions over the report tokens.

    `T^2 * KL(softmax(teacher / T) || softmax(student / T))`, summed over the vocabulary and averaged over the report
    tokens. Logits at position i predict token i + 1, so - exactly as the LM loss shifts them - `logits[:, :-1]` are
    compared where `labels[:, 1:]` is not -100: the diagnosis prompt and the padding carry no loss. The T^2 factor
    keeps the gradient scale independent of T (Hinton et al., 2015).

    Args:
        student_logits (`torch.Tensor` of shape `(B, L, V)`): The student decoder's logits.
        teacher_logits (`torch.Tensor` of shape `(B, L, V)`): The frozen teacher's logits for the same inputs.
        labels (`torch.LongTensor` of shape `(B, L)`): The LM labels (-100 on prompt and padding).
        temperature (`float`): Softening temperature T (> 0).

    Returns:
        A scalar in float32; 0 (still connected to the graph) when the batch has no report token.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    if student_logits.shape != teacher_logits.shape or student_logits.shape[:2] != labels.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} must be "
            f"(B, L, V) with (B, L) = labels {tuple(labels.shape)}."
        )
    report_tokens = labels[:, 1:] != IGNORE_INDEX
    if not report_tokens.any():
        return student_logits.sum() * 0.0
    # Softmax in float32: half-precision logits divided by T lose the small differences the loss is about.
    student = student_logits[:, :-1][report_tokens].float() / temperature  # (N, V)
    teacher = teacher_logits[:, :-1][report_tokens].float() / temperature
    divergence = F.kl_div(
        F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), reduction="batchmean", log_target=True
    )
    return temperature**2 * divergence


def relation_matrix(patch_features: torch.Tensor, cls_logits: torch.Tensor) -> torch.Tensor:
    """H = [F F^T || C C^T] (B, 2B) with unit-length rows: how each image of the batch relates to every other one.

    F (B, 49 * Hv) are the flattened patch features and C (B, 72) the flattened diagnosis-classifier logits.
    """
    # In float32 even under mixed precision: the Gram entries of 49 * 2048-wide features overflow float16.
    with torch.autocast(device_type=patch_features.device.type, enabled=False):
        features = patch_features.flatten(1).float()
        logits = cls_logits.flatten(1).float()
        relations = torch.cat([features @ features.T, logits @ logits.T], dim=1)
        return F.normalize(relations, dim=1)


def relational_loss(
    student_patch_features: torch.Tensor,
    student_cls_logits: torch.Tensor,
    teacher_patch_features: torch.Tensor,
    teacher_cls_logits: torch.Tensor,
) -> torch.Tensor:
    """Relational distillation: sum over the batch of the L2 distance between the student's and the teacher's rows of
    `relation_matrix`.

    Only (B, B) Gram matrices are compared, so the student's and teacher's feature widths may differ; any batch size
    works (a batch of one compares the normalised pair of its two squared norms).

    Args:
        student_patch_features (`torch.Tensor` of shape `(B, P, Hv)`): The student's image patch features.
        student_cls_logits (`torch.Tensor` of shape `(B, num_states, num_observations)`): Its classifier logits.
        teacher_patch_features, teacher_cls_logits: The same from the frozen teacher.

    Returns:
        A scalar in float32.
    """
    batch_sizes = {
        tensor.shape[0]
        for tensor in (student_patch_features, student_cls_logits, teacher_patch_features, teacher_cls_logits)
    }
    if len(batch_sizes) != 1:
        raise ValueError(f"Student and teacher tensors must share the batch size, got sizes {sorted(batch_sizes)}.")
    student = relation_matrix(student_patch_features, student_cls_logits)
    teacher = relation_matrix(teacher_patch_features, teacher_cls_logits)
    return (student - teacher).norm(dim=1).sum()


__all__ = ["kd_loss", "relation_matrix", "relational_loss"]
