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


def six_features(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    return tp.TrainState.create(model=model, optimizer=keras.optimizers.Adam(0.01))


def batches(n, features, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    return tf.data.Dataset.from_tensor_slices((x, rng.integers(0, 3, n).astype("int32"))).batch(4)


def test_late_refusals_come_at_the_bad_batch_or_before_training_naming_the_problem_first(
    tmp_path,
):
    step = tp.make_train_step(SCCE)
    # Batches of 6 features, then of 7: the data's shape leaves the size open (None).
    state, reference = six_features(), six_features()
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=r"\AFeature shape mismatch for model \w+ input 0 \(\w+\): expected \(None, 6\) "
        r".* this batch has the shape \[4 7\] \(nothing of the batch was applied\)",
    ):
        tp.fit_loop(state, batches(8, 6).concatenate(batches(8, 7)), step, epochs=1, verbose=0)
    tp.fold(step, reference, batches(8, 6))  # what ran before the bad batch: all of it
    assert int(state.step) == 2
    for a, b in zip(state.model.variables, reference.model.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # A generator cannot be iterated twice: said before training.
    state = six_features()
    with pytest.raises(TypeError, match=r"\A`data` is an iterator \(generator: a generator\?\)"):
        tp.fit_loop(state, (b for b in batches(8, 6)), step, epochs=2, verbose=0)
    assert int(state.step) == 0
    # Labels of unknown rank, which the loss takes.
    unknown = batches(8, 6).map(
        lambda x, y: (x, tf.reshape(y, tf.boolean_mask(tf.shape(y), [True])))
    )
    assert unknown.element_spec[1].shape.rank is None

    def flat_labels_loss(model, batch, training):  # a full-control loss
        x, y = batch
        logits = model(x, training=training)
        labels = tf.reshape(y, [-1])
        return tf.reduce_mean(SCCE(labels, logits)), logits

    tp.fold(tp.make_train_step(flat_labels_loss), state, unknown)
    assert int(state.step) == 2
    # No features, and features of the wrong size to predict: tfpure's words first.
    with pytest.raises(ValueError, match=r"\AThe batch has no features `x` \(found None\)"):
        step(state, (None, np.zeros(4, "int32")))
    sevens = batches(8, 7).map(lambda x, y: x)
    with pytest.raises(
        ValueError, match=r"\AFeature shape mismatch .* expected \(None, 6\).*\(None, 7\)"
    ):
        tp.predict(state, sevens)
    # A checkpoint directory that is a dangling symbolic link.
    (tmp_path / "ckpt").symlink_to(tmp_path / "gone")
    with pytest.raises(
        tp.CheckpointError,
        match=r"\ACannot write the checkpoint directory \S+ckpt: it is a symbolic link to \S+gone,"
        " which does not exist",
    ):
        tp.fit_loop(state, batches(8, 6), step, checkpoint=tp.Checkpointer(tmp_path / "ckpt"))
    assert int(state.step) == 2


def test_a_resume_asking_for_less_than_was_trained_says_so_and_trains_nothing(tmp_path):
    """A shorter budget, or fewer epochs, than the checkpoint's run: its state, with a word."""
    step = tp.make_train_step(SCCE)
    for unit, longer, shorter in (("steps", 6, 4), ("epochs", 2, 1)):
        ckpt, trained = tmp_path / unit, six_features()
        every = {"eval_every": 2} if unit == "steps" else {}  # the same windows
        run = {unit: longer, "checkpoint": tp.Checkpointer(ckpt), "verbose": 0, **every}
        tp.fit_loop(trained, batches(12, 6), step, **run)
        state = six_features(seed=1)
        run = {**run, unit: shorter, "checkpoint": tp.Checkpointer(ckpt)}
        with pytest.warns(RuntimeWarning, match=rf"trained {longer} {unit}, more than the "):
            tp.fit_loop(state, batches(12, 6), step, **run)
        assert int(state.step) == int(trained.step) == 6
        for a, b in zip(state.model.variables, trained.model.variables, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
