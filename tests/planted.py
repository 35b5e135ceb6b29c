"""Planted bugs the testing-kit tests share: each one an assertion of tfpure.testing catches."""

import keras
import tensorflow as tf

import tfpure as tp

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@tf.custom_gradient
def wrong_square(x):
    """x², with a wrong custom gradient: 3x where d(x²)/dx is 2x."""

    def grad(dy):
        return dy * 3.0 * x

    return x * x, grad


class WarmupStep:
    """Bug: a learning-rate warm-up counted in Python, which the graph freezes at 1."""

    def __init__(self):
        self.calls = 0
        self.step = tp.make_train_step(SCCE, grad_transform=self.warm_up)

    def warm_up(self, grads, variables):
        self.calls += 1  # runs once per trace in graph mode, once per step eagerly
        return [g * min(self.calls, 4) for g in grads]

    def __call__(self, state, batch):
        return self.step(state, batch)
