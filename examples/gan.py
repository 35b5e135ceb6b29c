"""Two states, two steps, one fold: a GAN on 1-D data with tfpure.

Run ``python examples/gan.py``. The generator learns to turn N(0, 1) noise
into samples of N(4, 0.5); it prints the mean and standard deviation of what
it generates before and after training.

The research pattern: each network has its own `TrainState` (model,
optimizer, metrics, seed generator) and its own full-control step; a plain
Python function composes them over a *pair* of states, and `tp.fold` runs
that function over the data like any other step.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

import tfpure as tp

TARGET_MEAN, TARGET_STD = 4.0, 0.5


def make_gan(seed: int = 0):
    """Returns ``((g_state, d_state), gan_step)``."""
    keras.utils.set_random_seed(seed)
    generator = keras.Sequential(
        [keras.Input((1,)), keras.layers.Dense(16, "tanh"), keras.layers.Dense(1)], name="generator"
    )
    discriminator = keras.Sequential(
        [keras.Input((1,)), keras.layers.Dense(16, "relu"), keras.layers.Dense(1)],
        name="discriminator",
    )
    g_state = tp.TrainState.create(
        model=generator, optimizer=keras.optimizers.Adam(5e-3, beta_1=0.5), seed=seed
    )
    d_state = tp.TrainState.create(
        model=discriminator, optimizer=keras.optimizers.Adam(5e-3, beta_1=0.5), seed=seed + 1
    )
    bce = keras.losses.BinaryCrossentropy(from_logits=True)

    def noise(batch: tf.Tensor) -> tf.Tensor:
        # Drawn from the generator state's own seed generator: checkpointable, reproducible.
        return keras.random.normal((tf.shape(batch)[0], 1), seed=g_state.rng)

    def discriminator_loss(model, real, training):
        fake = generator(noise(real), training=False)
        real_logits, fake_logits = model(real, training=training), model(fake, training=training)
        loss = bce(tf.ones_like(real_logits), real_logits) + bce(
            tf.zeros_like(fake_logits), fake_logits
        )
        return loss, None

    def generator_loss(model, real, training):
        logits = discriminator(model(noise(real), training=training), training=False)
        return bce(tf.ones_like(logits), logits), None  # fool the discriminator

    d_step = tp.make_train_step(discriminator_loss)  # gradients reach only the discriminator
    g_step = tp.make_train_step(generator_loss)  # gradients reach only the generator

    def gan_step(states, batch):
        g, d = states
        d, d_logs = d_step(d, batch)
        g, g_logs = g_step(g, batch)
        return (g, d), {"d_loss": d_logs["loss"], "g_loss": g_logs["loss"]}

    return (g_state, d_state), gan_step


def real_data(n: int = 512, batch: int = 64, seed: int = 0) -> tf.data.Dataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(TARGET_MEAN, TARGET_STD, size=(n, 1)).astype("float32")
    return tf.data.Dataset.from_tensor_slices(x).shuffle(n, seed=seed).batch(batch)


def generated(g_state: tp.TrainState, n: int = 2000) -> np.ndarray:
    z = np.random.default_rng(1).normal(size=(n, 1)).astype("float32")
    return g_state.model(z, training=False).numpy().ravel()


def main(epochs: int = 60, seed: int = 0) -> dict[str, float]:
    states, gan_step = make_gan(seed)
    before = generated(states[0])
    data = real_data(seed=seed)
    for _ in range(epochs):
        for state in states:
            state.reset_metrics()
        states, logs = tp.fold(gan_step, states, data)
    after = generated(states[0])
    print(f"generated before: mean {before.mean():.2f}, std {before.std():.2f}")
    print(
        f"generated after:  mean {after.mean():.2f}, std {after.std():.2f} "
        f"(target {TARGET_MEAN}, {TARGET_STD})"
    )
    print(f"last epoch: d_loss {float(logs['d_loss']):.3f}, g_loss {float(logs['g_loss']):.3f}")
    return {
        "mean": float(after.mean()),
        "std": float(after.std()),
        "mean_before": float(before.mean()),
    }


if __name__ == "__main__":
    main()
