"""The ISD losses against examples worked out by hand (closed forms in the comments), not against the same code."""

import math

import pytest
import torch

from distillation_kif import kd_loss, relation_matrix, relational_loss


IGNORE = -100
T = 4.0


def test_kd_loss_hand_computed_single_report_token():
    # Sequence of 3 positions; only labels[:, 1] is a report token, so only the logits at position 0 count.
    labels = torch.tensor([[IGNORE, 7, IGNORE]])
    # Position 0: teacher / T = [ln 3, 0] -> p_t = [3/4, 1/4]; student / T = [0, 0] -> p_s = [1/2, 1/2].
    teacher = torch.tensor([[[T * math.log(3.0), 0.0], [50.0, -50.0], [-50.0, 50.0]]])
    student = torch.tensor([[[0.0, 0.0], [-50.0, 50.0], [50.0, -50.0]]])
    # KL(p_t || p_s) = 3/4 ln(3/2) + 1/4 ln(1/2); times T^2.
    expected = T**2 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert kd_loss(student, teacher, labels, T).item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(2.092992, rel=1e-5)


def test_kd_loss_averages_over_report_tokens_and_ignores_prompt_and_padding():
    # Two sequences: row 0 has report tokens at labels positions 1 and 2, row 1 at position 1 only (then padding).
    labels = torch.tensor([[IGNORE, 4, 5, IGNORE], [IGNORE, 6, IGNORE, IGNORE]])
    student = torch.zeros(2, 4, 2)
    teacher = torch.zeros(2, 4, 2)
    # Counted positions (logits index = label index - 1): (0, 0), (0, 1), (1, 0).
    teacher[0, 0] = torch.tensor([T * math.log(3.0), 0.0])  # KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    teacher[0, 1] = torch.tensor([0.0, 0.0])  # KL = 0
    teacher[1, 0] = torch.tensor([0.0, T * math.log(4.0)])  # p_t = [1/5, 4/5]: KL = 1/5 ln(2/5) + 4/5 ln(8/5)
    # Prompt and padding positions: wildly different logits that must not count.
    teacher[0, 3] = teacher[1, 1] = teacher[1, 2] = teacher[1, 3] = torch.tensor([100.0, -100.0])
    student[0, 2] = torch.tensor([-100.0, 100.0])  # predicts the ignored label at position 3
    kl_a = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    kl_b = 0.2 * math.log(0.4) + 0.8 * math.log(1.6)
    expected = T**2 * (kl_a + 0.0 + kl_b) / 3
    assert kd_loss(student, teacher, labels, T).item() == pytest.approx(expected, rel=1e-5)


def test_kd_loss_is_zero_for_identical_logits_and_without_report_tokens():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.tensor([[IGNORE, 1, 2, 3, IGNORE], [IGNORE, 1, IGNORE, IGNORE, IGNORE]])
    assert kd_loss(logits, logits.detach(), labels, T).item() == pytest.approx(0.0, abs=1e-6)
    no_report = torch.full_like(labels, IGNORE)
    loss = kd_loss(logits, torch.randn(2, 5, 7), no_report, T)
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph, so a batch without report tokens does not break DDP
    assert logits.grad is not None


def test_kd_loss_gradient_reaches_student_only_on_report_positions():
    student = torch.randn(1, 4, 3, requires_grad=True)
    labels = torch.tensor([[IGNORE, IGNORE, 2, IGNORE]])
    kd_loss(student, torch.randn(1, 4, 3), labels, T).backward()
    moved = student.grad.abs().sum(dim=-1)[0]
    assert moved[1] > 0 and moved[0] == moved[2] == moved[3] == 0


def test_kd_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), 0.0)
    with pytest.raises(ValueError, match="must be"):
        kd_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.zeros(1, 2, dtype=torch.long), T)


def test_relational_loss_hand_computed_batch_of_two():
    # Student: f1 = [1, 0], f2 = [1, 1] -> F F^T = [[1, 1], [1, 2]]; c1 = [1], c2 = [0] -> C C^T = [[1, 0], [0, 0]].
    student_features = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]])
    student_logits = torch.tensor([[1.0], [0.0]])
    # Teacher: f1 = [1, 0], f2 = [0, 1] -> F F^T = I; c1 = [0], c2 = [1] -> C C^T = [[0, 0], [0, 1]].
    teacher_features = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    teacher_logits = torch.tensor([[0.0], [1.0]])
    # Rows: student [1, 1, 1, 0] / sqrt 3 and [1, 2, 0, 0] / sqrt 5; teacher [1, 0, 0, 0] and [0, 1, 0, 1] / sqrt 2.
    # For unit rows |a - b| = sqrt(2 - 2 a.b): a.b = 1 / sqrt 3 and 2 / sqrt 10.
    expected = math.sqrt(2 - 2 / math.sqrt(3)) + math.sqrt(2 - 4 / math.sqrt(10))
    loss = relational_loss(student_features, student_logits, teacher_features, teacher_logits)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(1.776774, rel=1e-5)
    rows = relation_matrix(student_features, student_logits)
    assert torch.allclose(rows[1], torch.tensor([1.0, 2.0, 0.0, 0.0]) / math.sqrt(5))


def test_relational_loss_hand_computed_batch_of_one():
    # Student: |f|^2 = 3^2 + 4^2 = 25, |c|^2 = 1 -> row [25, 1] / sqrt 626; teacher: |f|^2 = 1, |c|^2 = 1 -> [1, 1] / sqrt 2.
    loss = relational_loss(
        torch.tensor([[[3.0, 4.0]]]), torch.tensor([[1.0]]), torch.tensor([[[1.0, 0.0]]]), torch.tensor([[1.0]])
    )
    expected = math.sqrt(2 - 2 * 26 / (math.sqrt(626) * math.sqrt(2)))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_relational_loss_any_batch_size(batch_size):
    generator = torch.Generator().manual_seed(batch_size)
    # Model shapes: patches (B, 49, Hv) and classifier logits (B, 4, 18); the teacher may be wider.
    student_features = torch.randn(batch_size, 49, 16, generator=generator, requires_grad=True)
    student_logits = torch.randn(batch_size, 4, 18, generator=generator, requires_grad=True)
    teacher_features = torch.randn(batch_size, 49, 32, generator=generator)
    teacher_logits = torch.randn(batch_size, 4, 18, generator=generator)
    loss = relational_loss(student_features, student_logits, teacher_features, teacher_logits)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # Each row distance of unit vectors lies in [0, 2].
    assert 0 <= loss.item() <= 2 * batch_size
    loss.backward()
    assert torch.isfinite(student_features.grad).all() and torch.isfinite(student_logits.grad).all()
    # A student that relates the images exactly as the teacher does has no relational loss ...
    same = relational_loss(teacher_features, teacher_logits, teacher_features, teacher_logits)
    assert same.item() == pytest.approx(0.0, abs=1e-5)
    # ... and the loss does not depend on the order of the batch.
    order = torch.randperm(batch_size, generator=generator)
    permuted = relational_loss(
        student_features[order], student_logits[order], teacher_features[order], teacher_logits[order]
    )
    assert permuted.item() == pytest.approx(loss.item(), rel=1e-5)


def test_relational_loss_rejects_mismatched_batches():
    with pytest.raises(ValueError, match="batch size"):
        relational_loss(torch.randn(2, 4, 3), torch.randn(2, 72), torch.randn(3, 4, 3), torch.randn(3, 72))


def test_relational_loss_is_float32_under_bfloat16_autocast():
    features = torch.randn(2, 49, 64) * 30
    logits = torch.randn(2, 4, 18)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = relational_loss(features, logits, features * 2, logits)
    assert loss.dtype == torch.float32
    # Scaling every feature by 2 scales F F^T by 4 uniformly but not C C^T: rows change, so the loss is positive.
    assert loss.item() > 0
