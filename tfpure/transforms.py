"""Gradient transforms for ``make_train_step(..., grad_transform=...)``.

A transform is any function ``(grads, variables) -> grads`` (the
`GradTransform` protocol); a list of them applies in order. They run inside
the compiled step, between the gradient and the optimizer, on true
(unscaled) gradients even under a `LossScaleOptimizer`. These three are
conveniences; write your own the same way. For clipping alone, Keras'
optimizer options (``clipnorm``, ``global_clipnorm``) do the same job.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

__all__ = ["add_gradient_noise", "clip_by_global_norm", "mask_gradients"]

Grads = list[tf.Tensor | None]


def clip_by_global_norm(max_norm: float) -> Callable[[Grads, list[Any]], Grads]:
    """Scales all gradients together so their global norm is at most `max_norm`.

    Example:
      >>> import tensorflow as tf
      >>> from tfpure import transforms
      >>> clip = transforms.clip_by_global_norm(1.0)
      >>> [g.numpy().tolist() for g in clip([tf.constant([3.0]), tf.constant([4.0])], [None, None])]
      [[0.6000000238418579], [0.800000011920929]]
    """
    if not max_norm > 0:
        raise ValueError(f"`max_norm` must be > 0; got {max_norm!r}.")

    def clip(grads: Grads, variables: list[Any]) -> Grads:
        del variables
        present = [g for g in grads if g is not None]
        clipped, _ = tf.clip_by_global_norm(present, max_norm)
        it = iter(clipped)
        return [None if g is None else next(it) for g in grads]

    return clip


def add_gradient_noise(
    stddev: float, *, seed: int | keras.random.SeedGenerator | None = None
) -> Callable[[Grads, list[Any]], Grads]:
    """Adds Gaussian noise of standard deviation `stddev` to every gradient.

    The noise comes from a `keras.random.SeedGenerator`, drawn anew every step
    and reproducibly for a given seed. Pass ``seed=state.rng`` to draw from
    the state's generator, which a `Checkpointer` saves (so a resumed run
    draws the noise the interrupted one would have); an int seed makes a
    generator of the transform's own, which is not saved.

    Example:
      >>> import tensorflow as tf
      >>> from tfpure import transforms
      >>> noisy = transforms.add_gradient_noise(0.1, seed=0)
      >>> g = noisy([tf.zeros([1000])], [None])[0]
      >>> 0.08 < float(tf.math.reduce_std(g)) < 0.12
      True
    """
    if not stddev >= 0:
        raise ValueError(f"`stddev` must be >= 0; got {stddev!r}.")
    generator = (
        seed if isinstance(seed, keras.random.SeedGenerator) else keras.random.SeedGenerator(seed)
    )

    def add_noise(grads: Grads, variables: list[Any]) -> Grads:
        del variables
        return [
            None
            if g is None
            else g
            + tf.cast(keras.random.normal(tf.shape(g), stddev=stddev, seed=generator), g.dtype)
            for g in grads
        ]

    return add_noise


def mask_gradients(trainable: Callable[[Any], bool]) -> Callable[[Grads, list[Any]], Grads]:
    """Zeroes the gradients of variables for which ``trainable(variable)`` is False.

    With plain SGD this freezes those variables; optimizers with momentum or
    weight decay may still move them (use ``layer.trainable = False`` for a
    hard freeze).

    Example:
      >>> import keras, tensorflow as tf
      >>> from tfpure import transforms
      >>> layer = keras.layers.Dense(1, name="head"); layer.build((None, 2))
      >>> only_bias = transforms.mask_gradients(lambda v: v.path.endswith("bias"))
      >>> grads = only_bias([tf.ones((2, 1)), tf.ones((1,))], layer.trainable_variables)
      >>> [float(tf.reduce_sum(g)) for g in grads]
      [0.0, 1.0]
    """

    def mask(grads: Grads, variables: list[Any]) -> Grads:
        return [
            g if g is None or trainable(v) else tf.zeros_like(g)
            for g, v in zip(grads, variables, strict=True)
        ]

    return mask
