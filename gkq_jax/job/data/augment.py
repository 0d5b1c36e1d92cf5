"""Image augmentation as a pure, jit-able function of a PRNG key and a batch.

It runs inside the jitted train step, on the accelerator: a host-side numpy
version kept a GPU waiting on one CPU core for each batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def crop_flip_cutout(key: jax.Array, images: jax.Array, pad: int = 4,
                     cutout: int = 0) -> jax.Array:
  """Random crop after zero padding by ``pad``, random horizontal flip, and
  (``cutout`` > 0) one ``cutout`` x ``cutout`` square set to 0 (the mean after
  normalisation) at a random centre, clipped at the border (DeVries & Taylor,
  2017). ``images`` is (N, H, W, C); each image draws its own transform."""
  n, h, w, c = images.shape
  crop_key, flip_key, cut_key = jax.random.split(key, 3)
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * pad + 1)
  out = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(
      padded, offsets)
  flip = jax.random.bernoulli(flip_key, 0.5, (n,))
  out = jnp.where(flip[:, None, None, None], out[:, :, ::-1], out)
  if cutout > 0:
    centres = jax.random.randint(cut_key, (n, 2), 0, jnp.asarray([h, w]))
    first = centres - cutout // 2
    rows, cols = jnp.arange(h)[None], jnp.arange(w)[None]
    in_rows = (rows >= first[:, :1]) & (rows < first[:, :1] + cutout)
    in_cols = (cols >= first[:, 1:]) & (cols < first[:, 1:] + cutout)
    out = jnp.where((in_rows[:, :, None] & in_cols[:, None, :])[..., None], 0, out)
  return out
