"""Teacher-student distillation with an EMA teacher, as one user-written step.

Run ``python examples/distill.py``. A student CNN learns scikit-learn's bundled
8x8 digits from the labels and from a *teacher* whose weights are an
exponential moving average (EMA) of the student's, updated inside the same
compiled step (the mean-teacher pattern). It prints the validation accuracy
of both.

The research pattern: two `TrainState`s, ``{"student": ..., "teacher": ...}``;
the body trains the student with `apply_gradients`, then moves the teacher (a
state created with ``optimizer=None``) towards the student with `tp.ema`. The non-finite guard
covers both: a bad batch undoes the student's update *and* the EMA.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import tensorflow as tf

import tfpure as tp
from tfpure.demo import build_cnn, load_digits_split

DECAY = 0.9  # teacher <- DECAY * teacher + (1 - DECAY) * student
TEMPERATURE = 2.0
KL_WEIGHT = 0.3
CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def make_states(seed: int = 0) -> dict[str, tp.TrainState]:
    student = build_cnn(seed)
    teacher = keras.models.clone_model(student)
    teacher.set_weights(student.get_weights())
    return {
        "student": tp.TrainState.create(
            model=student, optimizer=keras.optimizers.Adam(3e-3), seed=seed
        ),
        # The teacher is not trained by an optimizer: a state without one.
        "teacher": tp.TrainState.create(model=teacher, optimizer=None),
    }


def distill_step(states, batch):
    """Cross-entropy on the labels plus a KL term towards the teacher; then the EMA."""
    student, teacher = states["student"], states["teacher"]
    x, y = batch
    soft = tf.nn.softmax(teacher.model(x, training=False) / TEMPERATURE)
    with tf.GradientTape() as tape:
        logits = student.model(x, training=True)
        hard = CE(y, logits)
        kl = tf.reduce_mean(
            tf.reduce_sum(
                soft * (tf.math.log(soft + 1e-8) - tf.nn.log_softmax(logits / TEMPERATURE)), 1
            )
        )
        loss = hard + KL_WEIGHT * kl + sum(student.model.losses)
    student = student.apply_gradients(tape.gradient(loss, student.model.trainable_variables))
    teacher = tp.ema(teacher, student, DECAY)
    for t, s in zip(teacher.model.variables, student.model.variables, strict=True):
        if not s.trainable:  # BatchNorm statistics and seeds follow the student as they are.
            t.assign(s)
    return {"student": student, "teacher": teacher}, {"loss": loss, "kl": kl}


def accuracy(model: keras.Model, data: tf.data.Dataset) -> float:
    metric = keras.metrics.SparseCategoricalAccuracy()
    for x, y in data:
        metric.update_state(y, model(x, training=False))
    return float(metric.result())


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    train, val, _ = load_digits_split(args.seed)
    states = make_states(args.seed)
    step = tp.make_step(distill_step, steps_per_call=4)
    states, history = tp.fit_loop(states, train, step, epochs=args.epochs, verbose=0)
    result = {
        "student": accuracy(states["student"].model, val),
        "teacher": accuracy(states["teacher"].model, val),
        "loss": history["loss"][-1],
    }
    print(
        f"after {args.epochs} epochs: loss {result['loss']:.3f}; val accuracy "
        f"student {result['student']:.4f}, EMA teacher {result['teacher']:.4f}"
    )
    return result


if __name__ == "__main__":
    main()
