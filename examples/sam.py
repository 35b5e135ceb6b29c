"""Sharpness-aware minimization (SAM): two forward/backward passes in one compiled step.

Run ``python examples/sam.py``. Trains the demo's CNN on scikit-learn's
bundled 8x8 digits with SAM (Foret et al., 2021): each step first climbs to
the worst nearby weights ``w + rho * g / ||g||``, takes the gradient there,
steps back to ``w`` and applies that gradient. It prints the validation
accuracy.

The research pattern: a body over one `TrainState` that needs two passes,
which no loss function can express; `tp.make_step` compiles it with fused
steps and the guard (if either gradient is not finite, the weights are
exactly as before the step, perturbation included).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import tensorflow as tf

import tfpure as tp
from tfpure.demo import build_cnn, load_digits_split

RHO = 0.05
CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def make_state(seed: int = 0, learning_rate: float = 3e-3) -> tp.TrainState:
    return tp.TrainState.create(
        model=build_cnn(seed),
        optimizer=keras.optimizers.Adam(learning_rate),
        metrics={"accuracy": keras.metrics.SparseCategoricalAccuracy()},  # for evaluate
        seed=seed,
    )


def loss_and_logits(model: keras.Model, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    logits = model(x, training=True)
    return CE(y, logits) + sum(model.losses), logits


def sam_step(state, batch, rho: float = RHO):
    x, y = batch
    variables = state.model.trainable_variables
    with tf.GradientTape() as tape:
        loss, logits = loss_and_logits(state.model, x, y)
    grads = tape.gradient(loss, variables)
    norm = tf.linalg.global_norm(grads) + 1e-12
    steps = [g * (rho / norm) for g in grads]
    for v, e in zip(variables, steps, strict=True):  # climb to w + e
        v.assign_add(e)
    with tf.GradientTape() as tape:
        sharp_loss, _ = loss_and_logits(state.model, x, y)
    sharp_grads = tape.gradient(sharp_loss, variables)
    for v, e in zip(variables, steps, strict=True):  # back to w
        v.assign_sub(e)
    state = state.apply_gradients(sharp_grads)
    correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=y.dtype), y), tf.float32)
    # Logs are per batch; the loops average them over the epoch, weighted by batch size.
    return state, {"loss": loss, "sharp_loss": sharp_loss, "accuracy": tf.reduce_mean(correct)}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    train, val, _ = load_digits_split(args.seed)
    state = make_state(args.seed)
    step = tp.make_step(sam_step, steps_per_call=4)
    state, history = tp.fit_loop(state, train, step, epochs=args.epochs, verbose=0)
    val_logs = tp.evaluate(state, val, tp.make_eval_step(CE))
    print(
        f"after {args.epochs} epochs: loss {history['loss'][-1]:.3f}, sharp loss "
        f"{history['sharp_loss'][-1]:.3f}, accuracy {history['accuracy'][-1]:.4f}; "
        f"val_loss {val_logs['loss']:.3f}"
    )
    print(f"val_accuracy: {val_logs['accuracy']:.4f}")
    return {"val_accuracy": val_logs["accuracy"], **{k: v[-1] for k, v in history.items()}}


if __name__ == "__main__":
    main()
