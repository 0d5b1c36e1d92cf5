"""Distillation loss from soft targets (gkq_jax.distill)."""

import jax
import numpy as np
import pytest

from gkq_jax import distill


def test_distillation_loss_matches_a_hand_computation():
  student = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], np.float32)
  teacher = np.array([[3.0, 1.0, 0.0], [0.5, 0.5, 2.0]], np.float32)
  t = 2.0
  p = np.exp(teacher / t) / np.exp(teacher / t).sum(1, keepdims=True)
  q = np.exp(student / t) / np.exp(student / t).sum(1, keepdims=True)
  expected = t ** 2 * np.mean(np.sum(p * np.log(p / q), 1))
  assert float(distill.distillation_loss(student, teacher, t)) == pytest.approx(expected,
                                                                                rel=1e-5)
  assert float(distill.distillation_loss(teacher, teacher, t)) == pytest.approx(0, abs=1e-6)
  # The gradient reaches the student only.
  g_teacher = jax.grad(lambda tl: distill.distillation_loss(student, tl, t))(teacher)
  assert np.all(np.asarray(g_teacher) == 0)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    distill.distillation_loss(student, teacher, 0.0)
