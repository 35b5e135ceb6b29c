"""A GAN as one user-written step: two states, one compiled body, `fit_loop`, checkpoints.

Run ``python examples/gan.py``. The generator learns to turn 8-dimensional
N(0, 1) noise into samples of N(4, 0.5); it prints the mean and standard
deviation of what it generates before and after training.

The research pattern: each network has its own `TrainState` (model,
optimizer, metrics, seed generator); one body ``gan_step(states, batch)``
updates the discriminator, then the generator, and `tp.make_step` compiles
it with everything a built-in step gets: fused steps (`steps_per_call`), the
non-finite guard across both states, `fit_loop`, and exact resume with a
`Checkpointer`. The generator's noise has a shape of its own: the body, not
tfpure, decides what a batch is.
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

import tfpure as tp

TARGET_MEAN, TARGET_STD = 4.0, 0.5
NOISE = 8


def make_states(seed: int = 0) -> dict[str, tp.TrainState]:
    """The generator and discriminator states, ``{"g": ..., "d": ...}``."""
    keras.utils.set_random_seed(seed)
    generator = keras.Sequential(
        [keras.Input((NOISE,)), keras.layers.Dense(16, "tanh"), keras.layers.Dense(1)],
        name="generator",
    )
    discriminator = keras.Sequential(
        [keras.Input((1,)), keras.layers.Dense(16, "relu"), keras.layers.Dense(1)],
        name="discriminator",
    )
    return {
        "g": tp.TrainState.create(
            model=generator, optimizer=keras.optimizers.Adam(5e-3, beta_1=0.5), seed=seed
        ),
        "d": tp.TrainState.create(
            model=discriminator, optimizer=keras.optimizers.Adam(5e-3, beta_1=0.5), seed=seed + 1
        ),
    }


BCE = keras.losses.BinaryCrossentropy(from_logits=True)


def gan_step(states, real):
    """One discriminator update, then one generator update, on a batch of real samples."""
    g, d = states["g"], states["d"]
    n = tf.shape(real)[0]
    # Noise from the generator state's own seed generator: checkpointed, reproducible.
    z = keras.random.normal((n, NOISE), seed=g.rng)
    with tf.GradientTape() as tape:
        real_logits = d.model(real, training=True)
        fake_logits = d.model(g.model(z, training=True), training=True)
        d_loss = BCE(tf.ones_like(real_logits), real_logits) + BCE(
            tf.zeros_like(fake_logits), fake_logits
        )
    d = d.apply_gradients(tape.gradient(d_loss, d.model.trainable_variables))

    z = keras.random.normal((n, NOISE), seed=g.rng)
    with tf.GradientTape() as tape:
        logits = d.model(g.model(z, training=True), training=True)
        g_loss = BCE(tf.ones_like(logits), logits)  # fool the discriminator
    g = g.apply_gradients(tape.gradient(g_loss, g.model.trainable_variables))
    return {"g": g, "d": d}, {"d_loss": d_loss, "g_loss": g_loss}


def real_data(n: int = 512, batch: int = 64, seed: int = 0) -> tf.data.Dataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(TARGET_MEAN, TARGET_STD, size=(n, 1)).astype("float32")
    return tf.data.Dataset.from_tensor_slices(x).shuffle(n, seed=seed).batch(batch)


def generated(g_state: tp.TrainState, n: int = 2000) -> np.ndarray:
    z = np.random.default_rng(1).normal(size=(n, NOISE)).astype("float32")
    return g_state.model(z, training=False).numpy().ravel()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", help="checkpoint directory (default: a new temporary one)")
    args = parser.parse_args(argv)

    states = make_states(args.seed)
    before = generated(states["g"])
    step = tp.make_step(gan_step, steps_per_call=8)
    ckpt = tp.Checkpointer(args.checkpoint or tempfile.mkdtemp(prefix="gan-"))
    states, history = tp.fit_loop(
        states, real_data(seed=args.seed), step, epochs=args.epochs, checkpoint=ckpt, verbose=0
    )
    after = generated(states["g"])
    print(f"generated before: mean {before.mean():.2f}, std {before.std():.2f}")
    print(
        f"generated after:  mean {after.mean():.2f}, std {after.std():.2f} "
        f"(target {TARGET_MEAN}, {TARGET_STD})"
    )
    print(f"last epoch: d_loss {history['d_loss'][-1]:.3f}, g_loss {history['g_loss'][-1]:.3f}")
    print(f"checkpoints in {ckpt.directory}: {len(ckpt.checkpoints())}")
    return {
        "mean": float(after.mean()),
        "std": float(after.std()),
        "mean_before": float(before.mean()),
    }


if __name__ == "__main__":
    main()
