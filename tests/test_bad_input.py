"""Bad input never crashes or corrupts: a clear exception naming the problem, no variable moved."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import tfpure as tp
from tfpure import testing as tpt
from tfpure.testing import strategies as tps

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

# kind -> (exception types, words the message must contain)
EXPECTED = {
    "rank": ((ValueError,), "Feature shape mismatch"),
    "feature_size": ((ValueError,), "Feature shape mismatch"),
    "string_features": ((ValueError,), "Feature dtype mismatch"),
    "four_parts": ((ValueError,), "tuple of 4 parts"),
    "no_targets": ((ValueError,), "has no targets"),
    "two_inputs": ((ValueError,), "takes 1 input"),
    # The op's own words first, not "Graph execution error:".
    "label_range": ((tf.errors.InvalidArgumentError,), r"\AReceived a label value of 99"),
    "batch_sizes": ((ValueError,), "disagree on the number of examples"),
    "nan_features": ((tp.NonFiniteError,), "the loss was nan"),
    "python_lists": ((TypeError,), r"holds Python numbers .* pass NumPy arrays"),
    "no_examples": ((ValueError,), "has no examples"),
}


def corrupt(kind, x, y):
    """A bad (x, y)-like batch of the given kind, from a good one."""
    if kind == "rank":
        return x[..., None], y
    if kind == "feature_size":
        return np.concatenate([x, x[:, :1]], axis=1), y
    if kind == "string_features":
        return x.astype(str), y
    if kind == "four_parts":
        return x, y, np.ones(len(y), "float32"), y
    if kind == "no_targets":
        return (x,)
    if kind == "two_inputs":
        return (x, x), y
    if kind == "label_range":
        return x, np.full_like(y, 99)
    if kind == "batch_sizes":
        return x, y[:-1]
    if kind == "nan_features":
        return np.full_like(x, np.nan), y
    if kind == "python_lists":
        return x.tolist(), y.tolist()
    if kind == "no_examples":
        return x[:0], y[:0]
    raise AssertionError(kind)


def everything(state, metrics=True):
    variables = [*state.model.variables, *state.optimizer.variables, state.step, state.skipped]
    if metrics:
        variables += [v for m in state.metrics.values() for v in m.variables]
        variables += [v for m in state.eval_metrics.values() for v in m.variables]
    return tpt.snapshot(variables)


def assert_unchanged(before, state, metrics=True):
    after = everything(state, metrics)
    moved = [k for k, v in before.items() if not np.array_equal(after[k], v, equal_nan=True)]
    assert not moved, f"variables changed: {moved}"


def trained_state(spec, seed):
    state = tp.TrainState.create(
        model=spec.build(seed),
        optimizer=keras.optimizers.Adam(0.01),
        metrics={"accuracy": keras.metrics.SparseCategoricalAccuracy()},
    )
    state, _ = tp.make_train_step(SCCE)(state, spec.batch(4, seed))  # slots and metrics non-zero
    return state


@pytest.mark.parametrize("kind", sorted(EXPECTED))
@settings(max_examples=1)  # one model per kind; the kinds are the cases
@given(spec=tps.model_specs(kinds=("dense",)), seed=tps.seeds(), size=st.integers(2, 6))
def test_a_step_refuses_bad_batches_and_changes_nothing(kind, spec, seed, size):
    state = trained_state(spec, seed)
    before = everything(state)
    errors, words = EXPECTED[kind]
    with pytest.raises(errors, match=words):
        tp.make_train_step(SCCE)(state, corrupt(kind, *spec.batch(size, seed + 1)))
    assert_unchanged(before, state)


STEP_ONLY = {"batch_sizes", "four_parts", "no_targets", "python_lists", "no_examples"}
DATASET_KINDS = [*sorted(set(EXPECTED) - STEP_ONLY), "empty", "empty_batch"]
# Found by running the first step, after the epoch began and reset the training metrics.
RUNTIME = {"label_range", "nan_features", "empty_batch"}


@pytest.mark.parametrize("kind", DATASET_KINDS)
@settings(max_examples=1)  # a whole fit_loop per example; the first draws fused calls
@given(
    spec=tps.model_specs(kinds=("dense",)),
    seed=tps.seeds(),
    steps_per_call=st.sampled_from([3, 1]),
)
def test_fit_loop_refuses_bad_data_and_changes_nothing(kind, spec, seed, steps_per_call):
    state = trained_state(spec, seed)
    before = everything(state, metrics=kind not in RUNTIME)
    x, y = spec.batch(12, seed + 1)
    if kind == "empty":
        data = tf.data.Dataset.from_tensor_slices((x, y)).take(0)
        errors, words = (ValueError,), "held no batch"
    elif kind == "empty_batch":  # a batch of 0 examples, then good ones
        good = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
        data = tf.data.Dataset.from_tensors((x[:0], y[:0])).concatenate(good)
        errors, words = (tp.NonFiniteError,), r"at step \d+ \(0-based\) the batch had no examples"
    else:
        bad = corrupt(kind, x, y)
        data = tf.data.Dataset.from_tensor_slices(bad).batch(4)
        errors, words = EXPECTED[kind]
    with pytest.raises(errors, match=words):
        tp.fit_loop(
            state,
            data,
            tp.make_train_step(SCCE, steps_per_call=steps_per_call),
            epochs=2,
            val_data=data,
            verbose=0,
        )
    assert_unchanged(before, state, metrics=kind not in RUNTIME)
