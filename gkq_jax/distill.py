"""Knowledge distillation from soft targets (Hinton et al.).

The student learns the teacher's class distribution softened by a
temperature T: the loss is ``T**2 * mean over the batch of KL(p_T || q_T)``,
``p_T = softmax(teacher / T)``, ``q_T = softmax(student / T)``. The T**2 factor
keeps its gradients on the scale of the hard-label cross-entropy it is added
to, whatever T (Hinton et al., section 2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def soft_targets(teacher_logits, temperature: float = 4.0) -> jax.Array:
  """The teacher's softened class distribution (no gradient flows into it)."""
  _check_temperature(temperature)
  return jax.nn.softmax(jax.lax.stop_gradient(jnp.asarray(teacher_logits)) / temperature, -1)


def distillation_loss(student_logits, teacher_logits, temperature: float = 4.0) -> jax.Array:
  """``T**2 * mean_batch KL(softmax(teacher / T) || softmax(student / T))``."""
  p = soft_targets(teacher_logits, temperature)
  log_q = jax.nn.log_softmax(jnp.asarray(student_logits) / temperature, -1)
  log_p = jnp.log(jnp.where(p > 0, p, 1.0))  # 0 log 0 = 0
  return temperature ** 2 * jnp.mean(jnp.sum(p * (log_p - log_q), -1))


def _check_temperature(temperature) -> None:
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
