"""`shared.reused`: a state and step used again compute what fresh ones compute."""

import keras
import numpy as np
import tensorflow as tf

import tfpure as tp
from tfpure.state import owned_variables
from tfpure.testing.strategies import ModelSpec

from shared import reused

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
SPEC = ModelSpec((5,), (("dense", 6), ("dropout", 50), ("batchnorm", 0)), num_classes=3, l2=0.01)


def build():
    state = tp.TrainState.create(
        model=SPEC.build(0),
        optimizer=keras.optimizers.Adam(0.01),
        metrics={"accuracy": keras.metrics.SparseCategoricalAccuracy()},
    )
    return state, tp.make_train_step(SCCE, nonfinite="skip")


def test_a_reused_state_and_step_run_as_fresh_ones_bit_for_bit():
    """Weights, slots, statistics, seeds, counts and the history, after other runs on them
    (one with a skipped batch) and between two uses of the same trace."""
    x, y = SPEC.batch(45, 0)
    clean = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    x = x.copy()  # (the clean data may hold `x`'s memory)
    x[3] = np.nan
    bad = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    ends = []
    for use in (build, lambda: reused("test", build), lambda: reused("test", build)):
        state, step = use()
        _, history = tp.fit_loop(state, clean, step, epochs=2, verbose=0)
        ends.append((history, [v.numpy() for v in owned_variables(state)], step.examples(state)))
        tp.fit_loop(state, bad, step, epochs=1, verbose=0)  # what the next use puts back
    (history, values, examples), *others = ends
    assert examples == 90
    for other_history, other_values, other_examples in others:
        assert other_history == history and other_examples == examples
        for a, b in zip(values, other_values, strict=True):
            np.testing.assert_array_equal(a, b)
    state, step = reused("test", build)
    window = step.engine(state).window.on_lasting
    assert int(state.step) == 0 and window.experimental_get_tracing_count() == 1  # one trace
