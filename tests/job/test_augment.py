"""On-device augmentation (gkq_jax.job.augment)."""

import jax
import jax.numpy as jnp
import numpy as np

from gkq_jax.job.data import augment as augment_lib


def test_augment_crops_flips_and_cuts_out():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(64, 12, 10, 2)).astype(np.float32)) + 10.0
  key = jax.random.PRNGKey(1)
  out = np.asarray(augment_lib.crop_flip_cutout(key, images, pad=2))
  np.testing.assert_array_equal(out, augment_lib.crop_flip_cutout(key, images, pad=2))
  assert out.shape == images.shape
  padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)))
  for i in range(len(out)):  # each output is one crop of the padded image, maybe mirrored
    windows = [padded[i, dy:dy + 12, dx:dx + 10] for dy in range(5) for dx in range(5)]
    assert any(np.array_equal(out[i], win) or np.array_equal(out[i], win[:, ::-1])
               for win in windows), i
  no_crop = np.asarray(augment_lib.crop_flip_cutout(key, images, pad=0))
  flipped = [not np.array_equal(o, im) for o, im in zip(no_crop, np.asarray(images))]
  assert 10 < sum(flipped) < 54  # about half are mirrored
  cut = np.asarray(augment_lib.crop_flip_cutout(key, images, pad=0, cutout=4))
  zeros = (cut[..., 0] == 0).sum(axis=(1, 2))  # the images hold no zeros before
  assert zeros.max() == 16 and zeros.min() >= 4  # a 4x4 square, clipped at the border
  np.testing.assert_array_equal(cut[cut != 0], no_crop[cut != 0])
