"""Benchmark your own model's training step: a small CNN with BatchNorm and Dropout.

Run ``python -m tfpure.bench examples/bench_cnn.py:make_state
examples/bench_cnn.py:make_data --loss sparse_categorical_crossentropy
--chart chart.png``. It prints the seconds per step of the same step run
eagerly, as a graph, fused 16 steps per call, under XLA, and through Keras
``fit`` on the same model, loss and optimizer (variants interleaved round by
round), and writes the chart. The two functions are all `tfpure.bench`
needs: a fresh state per call, and the data.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

import tfpure as tp


def make_state() -> tp.TrainState:
    """A fresh state, the same weights every call (each variant trains its own)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(10),
        ]
    )
    return tp.TrainState.create(
        model=model,
        optimizer=keras.optimizers.Adam(1e-3),
        metrics={"accuracy": keras.metrics.SparseCategoricalAccuracy()},
    )


def make_data() -> tf.data.Dataset:
    """2,048 random 16x16 RGB images in 32 batches of 64."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2048, 16, 16, 3)).astype("float32")
    y = rng.integers(0, 10, 2048).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(64)
