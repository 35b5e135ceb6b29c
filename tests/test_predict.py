"""tp.predict equals Keras' model.predict: single and multi-output models, fused calls."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpure as tp
from tfpure.predict import _predictor


def two_outputs():
    keras.utils.set_random_seed(0)
    x = keras.Input((4,), name="x")
    h = keras.layers.Dense(8, activation="relu")(x)
    h = keras.layers.Dropout(0.5)(h)  # training=False: no mask
    return keras.Model(x, {"a": keras.layers.Dense(3)(h), "b": keras.layers.Dense(1)(h)})


FEATURES = np.random.default_rng(0).normal(size=(23, 4)).astype("float32")
LABELS = np.zeros(23, "int32")


@pytest.mark.parametrize("k", [1, 3, 4])
def test_predict_equals_keras_predict_and_traces_once(k):
    model = two_outputs()
    state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())
    expected = model.predict(FEATURES, batch_size=5, verbose=0)
    # x alone, and (x, y) batches: the targets are ignored, as Keras ignores them.
    for data in (
        tf.data.Dataset.from_tensor_slices(FEATURES).batch(5),  # 5 batches, the last of 3
        tf.data.Dataset.from_tensor_slices((FEATURES, LABELS)).batch(5),
    ):
        got = tp.predict(state, data, steps_per_call=k)
        assert sorted(got) == ["a", "b"]
        for name in ("a", "b"):
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, atol=1e-6)
    again = tp.predict(
        state, tf.data.Dataset.from_tensor_slices(FEATURES[:7]).batch(5), steps_per_call=k
    )
    np.testing.assert_allclose(again["a"], expected["a"][:7], rtol=1e-6, atol=1e-6)
    predictor = _predictor(model, k)
    # One loop trace per element spec (x alone; (x, y)); one forward trace for all sizes.
    assert predictor.loop.experimental_get_tracing_count() == 2
    assert predictor.forward.experimental_get_tracing_count() == 1


def test_predict_refuses_bad_arguments_clearly():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    data = tf.data.Dataset.from_tensor_slices(FEATURES).batch(5)
    with pytest.raises(TypeError, match=r"tf\.data\.Dataset of batches"):
        tp.predict(model, FEATURES)
    with pytest.raises(ValueError, match="steps_per_call"):
        tp.predict(model, data, steps_per_call=0)
    with pytest.raises(ValueError, match="held no batch"):
        tp.predict(model, data.take(0))
    with pytest.raises(TypeError, match="TrainState or a Keras model"):
        tp.predict("model", data)
