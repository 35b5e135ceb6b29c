"""WGAN-GP: a gradient penalty through a nested tape, five critic updates per generator update.

Run ``python examples/wgan_gp.py``. A generator learns to turn 4-dimensional
noise into points on a ring of eight Gaussians, against a critic trained with
the Wasserstein loss and a gradient penalty (Gulrajani et al., 2017). It
prints the generated points' mean distance to the nearest mode before and
after training.

The research pattern, written as a researcher writes it: every step updates
the critic; the generator is updated on every fifth critic update, by
`tf.cond` on the critic's step count, under the default non-finite guard (a
batch that leaves a non-finite value changes neither network, whichever
branch ran). The generator's loss exists only on those steps: the body
returns it as ``tp.log_if(update, g_loss)``, so its epoch mean is over the
steps that computed it.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

import tfpure as tp

NOISE = 4
N_CRITIC = 5  # critic updates per generator update
GP_WEIGHT = 10.0
MODES = 8
RADIUS, SPREAD = 2.0, 0.05


def make_states(seed: int = 0) -> dict[str, tp.TrainState]:
    """The generator and critic states, ``{"g": ..., "d": ...}``, with Adam(1e-3, 0.5, 0.9)."""
    keras.utils.set_random_seed(seed)
    generator = keras.Sequential(
        [keras.Input((NOISE,)), keras.layers.Dense(32, "relu"), keras.layers.Dense(2)],
        name="generator",
    )
    critic = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(32, "relu"), keras.layers.Dense(1)], name="critic"
    )

    def adam() -> keras.optimizers.Optimizer:
        return keras.optimizers.Adam(1e-3, beta_1=0.5, beta_2=0.9)

    return {
        "g": tp.TrainState.create(model=generator, optimizer=adam(), seed=seed),
        "d": tp.TrainState.create(model=critic, optimizer=adam(), seed=seed + 1),
    }


def ring_data(n: int = 512, batch: int = 64, seed: int = 0) -> tf.data.Dataset:
    """`n` points around a ring of `MODES` Gaussians, in batches of `batch` (not shuffled)."""
    rng = np.random.default_rng(seed)
    angles = 2 * np.pi * rng.integers(0, MODES, n) / MODES
    centres = RADIUS * np.stack([np.cos(angles), np.sin(angles)], 1)
    points = (centres + SPREAD * rng.normal(size=(n, 2))).astype("float32")
    return tf.data.Dataset.from_tensor_slices(points).batch(batch)


def gradient_penalty(critic: keras.Model, real: tf.Tensor, fake: tf.Tensor, eps: tf.Tensor):
    """E[(||grad_x critic(x)|| - 1)^2] at points `x` between real and fake (a nested tape)."""
    mixed = eps * real + (1.0 - eps) * fake
    with tf.GradientTape() as tape:
        tape.watch(mixed)
        scores = critic(mixed, training=True)
    grads = tape.gradient(scores, mixed)
    return tf.reduce_mean((tf.norm(grads, axis=1) - 1.0) ** 2)


def critic_loss(generator, critic, real, z, eps):
    """The critic's Wasserstein loss plus the weighted gradient penalty; and the penalty."""
    fake = generator(z, training=True)
    gp = gradient_penalty(critic, real, fake, eps)
    wasserstein = tf.reduce_mean(critic(fake, training=True)) - tf.reduce_mean(
        critic(real, training=True)
    )
    return wasserstein + GP_WEIGHT * gp, gp


def generator_loss(generator, critic, z):
    return -tf.reduce_mean(critic(generator(z, training=True), training=True))


def wgan_gp_step(states, real):
    """One critic update; on every `N_CRITIC`-th, one generator update too."""
    g, d = states["g"], states["d"]
    n = tf.shape(real)[0]
    z = keras.random.normal((n, NOISE), seed=g.rng)
    eps = keras.random.uniform((n, 1), seed=d.rng)
    with tf.GradientTape() as tape:
        d_loss, gp = critic_loss(g.model, d.model, real, z, eps)
    d.apply_gradients(tape.gradient(d_loss, d.model.trainable_variables))
    update = d.step % N_CRITIC == 0

    def train_generator() -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = generator_loss(g.model, d.model, z)
        g.apply_gradients(tape.gradient(loss, g.model.trainable_variables))
        return loss

    g_loss = tf.cond(update, train_generator, lambda: tf.constant(0.0))
    return states, {"d_loss": d_loss, "gp": gp, "g_loss": tp.log_if(update, g_loss)}


def distance_to_modes(generator: keras.Model, n: int = 1000, seed: int = 1) -> float:
    """The mean distance of `n` generated points to the nearest mode's centre."""
    z = np.random.default_rng(seed).normal(size=(n, NOISE)).astype("float32")
    points = generator(z, training=False).numpy()
    angles = 2 * np.pi * np.arange(MODES) / MODES
    centres = RADIUS * np.stack([np.cos(angles), np.sin(angles)], 1)
    return float(np.linalg.norm(points[:, None] - centres[None], axis=-1).min(1).mean())


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    states = make_states(args.seed)
    before = distance_to_modes(states["g"].model)
    step = tp.make_step(wgan_gp_step, steps_per_call=8)
    states, history = tp.fit_loop(
        states, ring_data(seed=args.seed), step, epochs=args.epochs, verbose=0
    )
    after = distance_to_modes(states["g"].model)
    print(f"distance of generated points to the nearest mode: {before:.3f} -> {after:.3f}")
    print(
        f"last epoch: d_loss {history['d_loss'][-1]:.3f}, gp {history['gp'][-1]:.4f}, "
        f"g_loss {history['g_loss'][-1]:.3f} (over {int(states['g'].step)} generator updates "
        f"and {int(states['d'].step)} critic updates in all)"
    )
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
