"""tfpure.testing on real layer families: correct code passes, a planted bug per family fails.

Families: a masked LSTM (`mask_zero` adds a `NotEqual` op to the graph), a Transformer
block written as a custom layer building its own sublayers plus a functional `x + h`, a
CNN with a conv bias before BatchNorm trained by Adam (a numerically zero gradient), an
`add_loss` layer, an Embedding trained through a full-control loss.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from planted import WarmupStep, wrong_square

import tfpure as tp
from tfpure import testing as tpt

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
RNG = np.random.default_rng(0)
LABELS = RNG.integers(0, 3, 8).astype("int32")


class SquareInTraining(keras.layers.Layer):
    """x², through a wrong custom gradient when `training` (else plain autodiff)."""

    def call(self, x, training=None):
        return wrong_square(x) if training else x * x


class Block(keras.layers.Layer):
    """A Transformer encoder block that builds its own sublayers."""

    def __init__(self, dim, heads, square=False, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.heads, self.square = dim, heads, square
        self.attention = keras.layers.MultiHeadAttention(heads, dim // heads)
        self.norm1 = keras.layers.LayerNormalization()
        self.ffn = keras.layers.Dense(dim, activation="relu")
        self.norm2 = keras.layers.LayerNormalization()
        self.act = SquareInTraining() if square else None

    def call(self, x, training=None):
        h = self.norm1(x + self.attention(x, x))
        f = self.ffn(h)
        if self.act is not None:
            f = self.act(f, training=training)
        return self.norm2(h + f)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "heads": self.heads, "square": self.square}


def transformer(square=False):
    keras.utils.set_random_seed(0)
    tokens = keras.Input((4, 8))
    h = Block(8, 2, square=square)(tokens)
    h = h + keras.layers.Dense(8)(tokens)  # a functional `+`: an op, not a layer
    return keras.Model(tokens, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(h)))


def masked_lstm(square=False):
    keras.utils.set_random_seed(0)
    tokens = keras.Input((6,), dtype="int32")
    h = keras.layers.LSTM(5)(keras.layers.Embedding(10, 4, mask_zero=True)(tokens))
    if square:
        h = SquareInTraining()(h)
    return keras.Model(tokens, keras.layers.Dense(3)(h))


def bn_cnn():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(4, 3, padding="same"),  # its bias: gradient ~1e-9 before BN
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Dropout(0.3, seed=0),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )


class Penalised(keras.layers.Dense):
    def call(self, x):
        out = super().call(x)
        self.add_loss(0.01 * keras.ops.sum(keras.ops.square(out)))
        return out


def add_loss_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((4,)), Penalised(5, activation="tanh"), keras.layers.Dense(3)]
    )


PADDED = np.where(np.arange(6) < RNG.integers(1, 7, (8, 1)), RNG.integers(1, 10, (8, 6)), 0).astype(
    "int32"
)  # each row's tail is padding (token 0, masked)
SEQUENCES = RNG.normal(size=(8, 4, 8)).astype("float32")
IMAGES = RNG.normal(size=(8, 6, 6, 2)).astype("float32")
FEATURES = RNG.normal(size=(8, 4)).astype("float32")


def full_control(model, batch, training):
    """A full-control loss calling a keras.losses object (it fixes float32 when made)."""
    x, y = batch
    y_pred = model(x, training=training)
    return SCCE(y, y_pred), y_pred


@pytest.mark.parametrize(
    ("build", "x"), [(masked_lstm, PADDED), (transformer, SEQUENCES)], ids=["lstm", "block"]
)
def test_gradients_hold_on_both_paths_and_catch_a_bug_of_the_training_path(build, x):
    """The float64 copy rebuilds `NotEqual`, `x + h` and a custom layer's sublayers in
    float64; a gradient wrong only under training=True passes the training=False check
    and fails the training=True one."""
    tpt.assert_gradients_match_numeric(build(), full_control, (x, LABELS))
    tpt.assert_gradients_match_numeric(build(), SCCE, (x, LABELS), training=True)
    buggy = build(square=True)
    tpt.assert_gradients_match_numeric(buggy, SCCE, (x, LABELS))
    with pytest.raises(AssertionError, match="differ from central finite differences"):
        tpt.assert_gradients_match_numeric(buggy, SCCE, (x, LABELS), training=True)


def adam_state(build):
    return lambda: tp.TrainState.create(model=build(), optimizer=keras.optimizers.Adam(0.01))


def test_graph_matches_eager_under_adam_on_a_numerically_zero_gradient():
    """A conv bias before BatchNorm: Adam turns its gradient of rounding noise into ±lr
    moves. Without the rounding band that bias differs far beyond atol; with it the same
    step passes, against eager and against the tutorial's step."""
    batches = [(IMAGES, LABELS)] * 3
    step = tp.make_train_step(SCCE)
    with pytest.raises(AssertionError, match=r"conv2d\S*/bias: max \|graph - eager\|"):
        tpt.assert_graph_matches_eager(adam_state(bn_cnn), step, batches, rounding_band=False)
    tpt.assert_graph_matches_eager(adam_state(bn_cnn), step, batches)
    tpt.assert_step_matches_reference(adam_state(bn_cnn), step, SCCE, batches)


def test_the_rounding_band_does_not_hide_python_state_frozen_at_trace_time():
    """Each run of the buggy step ends elsewhere (the counter moved on), the nudged run
    too: its figures differ, so no band is applied and the bug is reported."""
    batches = [(IMAGES, LABELS)] * 4
    with pytest.raises(AssertionError, match=r"(?s)kernel: max \|graph - eager\|.*no rounding"):
        tpt.assert_graph_matches_eager(adam_state(bn_cnn), WarmupStep(), batches)


def test_add_loss_and_a_full_control_loss_against_the_reference_step():
    """A user body that forgets `model.losses` (the add_loss penalty) is caught; the
    correct body passes."""

    def body(forget):
        def train(state, batch):
            x, y = batch
            with tf.GradientTape() as tape:
                y_pred = state.model(x, training=True)
                loss = SCCE(y, y_pred) + (0.0 if forget else tf.add_n(state.model.losses))
            state = state.apply_gradients(tape.gradient(loss, state.model.trainable_variables))
            state.metrics["loss"].update_state(loss, sample_weight=tf.shape(x)[0])
            return state, {"loss": loss}

        return tp.make_step(train)

    batches = [(FEATURES, LABELS)] * 3
    make = adam_state(add_loss_model)
    tpt.assert_gradients_match_numeric(add_loss_model(), full_control, batches[0])
    tpt.assert_step_matches_reference(make, body(forget=False), SCCE, batches)
    with pytest.raises(AssertionError, match=r"penalised\w*/kernel: max \|step - reference\|"):
        tpt.assert_step_matches_reference(make, body(forget=True), SCCE, batches)
