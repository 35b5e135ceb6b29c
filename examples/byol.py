"""BYOL: an online network learns from a moving-average target of itself, without labels.

Run ``python examples/byol.py``. An encoder learns representations of
scikit-learn's bundled 8x8 digits from two augmented views of each image
(Grill et al., 2020): the online encoder and a predictor are trained to
predict the *target* encoder's projection of the other view; the target is
an exponential moving average of the online encoder. It prints the
nearest-centroid accuracy of the encoder's representations on held-out
digits, before and after training (the labels are used for that alone).

The research pattern: three states, ``{"online", "predictor", "target"}``.
The target is a state that is not trained (``optimizer=None``), updated
inside the body by `tp.ema`: the non-finite guard checks and rolls it back
with the others, and a `Checkpointer` saves it. The two views are drawn
from the online state's seed generator, so a run is reproducible and
resumes bit for bit.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

import tfpure as tp
from tfpure.demo import load_digits_split

DECAY = 0.99  # target <- DECAY * target + (1 - DECAY) * online
WIDTH = 32  # the projection's width


def encoder(seed: int) -> keras.Model:
    """Flattened 8x8 digits -> a representation, then a projection of it."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(128, "relu", name="representation"),
            keras.layers.Dense(WIDTH, name="projection"),
        ],
        name="encoder",
    )


def make_states(seed: int = 0) -> dict[str, tp.TrainState]:
    online = encoder(seed)
    target = keras.models.clone_model(online)
    target.set_weights(online.get_weights())
    keras.utils.set_random_seed(seed + 1)
    predictor = keras.Sequential(
        [keras.Input((WIDTH,)), keras.layers.Dense(64, "relu"), keras.layers.Dense(WIDTH)],
        name="predictor",
    )
    return {
        "online": tp.TrainState.create(
            model=online, optimizer=keras.optimizers.Adam(1e-3), seed=seed
        ),
        "predictor": tp.TrainState.create(model=predictor, optimizer=keras.optimizers.Adam(1e-3)),
        "target": tp.TrainState.create(model=target, optimizer=None),
    }


def augment(x: tf.Tensor, rng: keras.random.SeedGenerator) -> tf.Tensor:
    """A random view: each image scaled in brightness, shifted by a pixel, and noised."""
    n = tf.shape(x)[0]
    scale = keras.random.uniform((n, 1, 1, 1), 0.7, 1.3, seed=rng)
    shifted = tf.roll(x, shift=1, axis=2)
    shift = tf.cast(keras.random.uniform((n, 1, 1, 1), seed=rng) < 0.5, x.dtype)
    x = shift * shifted + (1.0 - shift) * x
    return tf.clip_by_value(
        x * scale + keras.random.normal(tf.shape(x), stddev=0.1, seed=rng), 0, 1
    )


def regression_loss(p: tf.Tensor, z: tf.Tensor) -> tf.Tensor:
    """2 - 2 cos(p, z), per example."""
    return 2.0 - 2.0 * tf.reduce_sum(tf.math.l2_normalize(p, 1) * tf.math.l2_normalize(z, 1), 1)


def byol_step(states, batch):
    """The symmetric BYOL loss on two views; the online encoder and predictor are updated,
    then the target follows the online encoder by `tp.ema`."""
    online, predictor, target = states["online"], states["predictor"], states["target"]
    x, _ = batch  # the labels are not used
    v1, v2 = augment(x, online.rng), augment(x, online.rng)
    z1, z2 = target.model(v1, training=True), target.model(v2, training=True)
    with tf.GradientTape() as tape:
        p1 = predictor.model(online.model(v1, training=True), training=True)
        p2 = predictor.model(online.model(v2, training=True), training=True)
        loss = tf.reduce_mean(regression_loss(p1, z2) + regression_loss(p2, z1))
    grads = tape.gradient(
        loss, online.model.trainable_variables + predictor.model.trainable_variables
    )
    n = len(online.model.trainable_variables)
    online.apply_gradients(grads[:n])
    predictor.apply_gradients(grads[n:])
    tp.ema(target, online, DECAY)
    return states, {"loss": loss}


def centroid_accuracy(model: keras.Model, train: tf.data.Dataset, val: tf.data.Dataset) -> float:
    """Nearest-centroid accuracy on `val` of the representations (the layer before the
    projection), with class centroids from `train`."""
    features = keras.Model(model.inputs, model.get_layer("representation").output)

    def embed(data):
        pairs = [(features(x, training=False).numpy(), y.numpy()) for x, y in data]
        return np.concatenate([f for f, _ in pairs]), np.concatenate([y for _, y in pairs])

    (f_train, y_train), (f_val, y_val) = embed(train), embed(val)
    centroids = np.stack([f_train[y_train == c].mean(0) for c in range(10)])
    distances = np.linalg.norm(f_val[:, None] - centroids[None], axis=-1)
    return float((distances.argmin(1) == y_val).mean())


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    train, val, _ = load_digits_split(args.seed)
    states = make_states(args.seed)
    before = centroid_accuracy(states["online"].model, train, val)
    step = tp.make_step(byol_step, steps_per_call=4)
    states, history = tp.fit_loop(states, train, step, epochs=args.epochs, verbose=0)
    after = centroid_accuracy(states["online"].model, train, val)
    print(
        f"BYOL loss {history['loss'][0]:.3f} -> {history['loss'][-1]:.3f}; nearest-centroid "
        f"accuracy of the representations: {before:.4f} -> {after:.4f}"
    )
    return {"before": before, "after": after, "loss": history["loss"]}


if __name__ == "__main__":
    main()
