"""The README's main job: train a small CNN on handwritten digits with tfpure.

Run it with ``python -m tfpure.demo``. It trains a Keras CNN on scikit-learn's
bundled 8x8 digits (1,797 images, no download) with `fit_loop`, a held-out
validation split and Keras' progress bar; then times the same training step
run eagerly and as a graph with `tfpure.bench.compare`; its last line reports
the validation accuracy.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import tensorflow as tf

import tfpure as tp


def load_digits_split(seed: int) -> tuple[tf.data.Dataset, tf.data.Dataset, int]:
    """Digits as (8, 8, 1) images in [0, 1]; a stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=seed
    )
    train = (
        tf.data.Dataset.from_tensor_slices((x_train, y_train))
        .shuffle(len(x_train), seed=seed)
        .batch(64)
        .prefetch(tf.data.AUTOTUNE)
    )
    val = tf.data.Dataset.from_tensor_slices((x_val, y_val)).batch(256)
    return train, val, len(x_train)


def build_cnn(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(10, kernel_regularizer=keras.regularizers.L2(1e-4)),
        ],
        name="digits_cnn",
    )


def new_state(seed: int) -> tp.TrainState:
    return tp.TrainState.create(
        model=build_cnn(seed),
        optimizer=keras.optimizers.Adam(3e-3),
        metrics={"accuracy": keras.metrics.SparseCategoricalAccuracy()},
        seed=seed,
    )


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        prog="python -m tfpure.demo",
        description="Train a small Keras CNN on scikit-learn's bundled 8x8 digits with "
        "tfpure's fit_loop (no download), then time one training step run eagerly and "
        "as a graph. The last line is the validation accuracy.",
    )
    parser.add_argument("--epochs", type=int, default=20, help="epochs to train (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, weights, masks")
    parser.add_argument(
        "--verbose",
        type=int,
        default=1,
        choices=(0, 1, 2),
        help="0 silent, 1 progress bar (default), 2 one line per epoch",
    )
    args = parser.parse_args(argv)

    start = time.perf_counter()
    train, val, n_train = load_digits_split(args.seed)
    state = new_state(args.seed)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    print(f"tfpure demo: {n_train} training digits, CNN with {state.model.count_params()} weights")
    state, history = tp.fit_loop(
        state,
        train,
        tp.make_train_step(loss),
        epochs=args.epochs,
        eval_step=tp.make_eval_step(loss),
        val_data=val,
        verbose=args.verbose,
    )
    trained = time.perf_counter() - start
    print(f"training time: {trained:.1f} s for {args.epochs} epochs ({int(state.step)} steps)")
    # The same step on fresh states, eagerly and as a graph, interleaved round by round.
    timing = tp.bench.compare(
        lambda: new_state(args.seed),
        loss,
        train,
        variants=("eager", "graph"),
        rounds=3,
        steps=int(train.cardinality()),  # an epoch's steps (eager runs an eighth)
    )
    eager, graph = timing.median["eager"], timing.median["graph"]
    ratio = timing.paired("eager", "graph")
    print(
        f"per-step time (tfpure.bench, {len(timing.rounds['graph'])} rounds): "
        f"eager {eager * 1e3:.2f} ms, graph {graph * 1e3:.2f} ms, eager/graph = {ratio:.1f}x"
    )
    val_accuracy = history["val_accuracy"][-1]
    print(f"val_accuracy: {val_accuracy:.4f}")
    return {"val_accuracy": val_accuracy, "seconds": trained, "eager_over_graph": ratio}


if __name__ == "__main__":
    main()
