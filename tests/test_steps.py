"""make_train_step / make_eval_step against the tutorial loop and Keras' own steps."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import tfpure as tp
from tfpure import testing as tpt
from tfpure.testing import strategies as tps
from tfpure.testing.strategies import ModelSpec

from reference import preempted_after, tutorial_train_step, twin

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
SPEC = ModelSpec((5,), (("dense", 6), ("dropout", 50), ("batchnorm", 0)), num_classes=3, l2=0.01)


def accuracy():
    return {"accuracy": keras.metrics.SparseCategoricalAccuracy()}


def make_state(model, optimizer=None, **kwargs):
    return tp.TrainState.create(
        model=model,
        optimizer=optimizer or keras.optimizers.Adam(0.01),
        metrics=accuracy(),
        **kwargs,
    )


# Comparisons against another graph (Keras' own steps, another loss path) allow float32
# reordering: oneDNN orders sums differently from one CPU to another, and Adam turns a
# rounding difference in a near-zero gradient into a visible one. Same-graph comparisons
# (the tutorial's step, which runs the same ops) stay bit for bit.
CROSS_GRAPH = {"rtol": 1e-5, "atol": 1e-6}


def assert_same_variables(a, b, rtol=0.0, atol=0.0):
    for va, vb in zip(a, b, strict=True):
        np.testing.assert_allclose(va.numpy(), vb.numpy(), rtol=rtol, atol=atol, err_msg=va.path)


@settings(max_examples=3)  # each example traces two steps
@given(
    spec=tps.model_specs(),
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=5),
    seed=tps.seeds(),
    adam=st.booleans(),
)
def test_unguarded_train_step_equals_tutorial_loop_bit_for_bit(spec, sizes, seed, adam):
    """Without the guard a step runs the tutorial's very ops, traced (like tfpure's) with
    the batch dimension free: the same variables, bit for bit, on any CPU (CI runs this
    with oneDNN on and, on the tested floor, off)."""
    model = spec.build(seed)
    reference = twin(model)
    opt = (lambda: keras.optimizers.Adam(0.01)) if adam else (lambda: keras.optimizers.SGD(0.1))
    state = make_state(model, opt())
    ref_opt = opt()
    ref_opt.build(reference.trainable_variables)
    ref_loss, ref_acc = keras.metrics.Mean(), keras.metrics.SparseCategoricalAccuracy()
    free_batch = (
        tf.TensorSpec([None, *spec.input_shape], tf.float32),
        tf.TensorSpec([None], tf.int32),
    )
    ref_step = tutorial_train_step(reference, ref_opt, SCCE, ref_loss, ref_acc, free_batch)
    step = tp.make_train_step(SCCE, nonfinite=None)
    for i, size in enumerate(sizes):
        x, y = spec.batch(size, seed + i)
        state, logs = step(state, (x, y))
        ref_step(x, y)
    assert_same_variables(model.variables, reference.variables)
    assert_same_variables(state.optimizer.variables, ref_opt.variables)
    assert float(logs["accuracy"]) == float(ref_acc.result())
    assert int(state.step) == len(sizes)
    if len(set(sizes)) == 1:  # equal batches: batch-weighted mean == mean of batch losses
        np.testing.assert_allclose(float(logs["loss"]), float(ref_loss.result()), rtol=1e-5)


@settings(max_examples=3)  # each example traces two steps
@given(
    spec=tps.model_specs(),
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=5),
    seed=tps.seeds(),
)
def test_guarded_train_step_equals_tutorial_loop(spec, sizes, seed):
    """The guard applies the update inside a tf.cond: another graph, so float32 noise in a
    numerically-zero gradient may differ (seen: 2e-9 on a BatchNorm beta with oneDNN off).
    SGD keeps such noise at its size; Adam divides it by its own root mean square, which
    makes a tolerance meaningless there, so this check uses SGD."""
    model = spec.build(seed)
    reference = twin(model)
    state = make_state(model, keras.optimizers.SGD(0.1))
    ref_opt = keras.optimizers.SGD(0.1)
    ref_opt.build(reference.trainable_variables)
    ref_loss, ref_acc = keras.metrics.Mean(), keras.metrics.SparseCategoricalAccuracy()
    ref_step = tutorial_train_step(reference, ref_opt, SCCE, ref_loss, ref_acc)
    step = tp.make_train_step(SCCE)
    for i, size in enumerate(sizes):
        x, y = spec.batch(size, seed + i)
        state, logs = step(state, (x, y))
        ref_step(x, y)
    assert_same_variables(model.variables, reference.variables, **CROSS_GRAPH)
    assert float(logs["accuracy"]) == float(ref_acc.result())
    assert int(state.step) == len(sizes)


def keras_twin(model, optimizer, loss=SCCE, **compile_kwargs):
    reference = twin(model)
    reference.compile(optimizer=optimizer, loss=loss, **compile_kwargs)
    return reference


def test_loss_weighted_by_batch_size_like_keras_fit():
    model = SPEC.build(0)
    reference = keras_twin(model, keras.optimizers.Adam(0.01), metrics=["accuracy"])
    state, step = make_state(model), tp.make_train_step(SCCE)
    batches = [SPEC.batch(n, n) for n in (8, 8, 3)]
    for x, y in batches:
        state, logs = step(state, (x, y))
    ds = tf.data.Dataset.from_tensor_slices(
        tuple(map(np.concatenate, zip(*batches, strict=True)))
    ).batch(8)
    history = reference.fit(ds, epochs=1, verbose=0, shuffle=False).history
    np.testing.assert_allclose(float(logs["loss"]), history["loss"][0], rtol=1e-5)
    np.testing.assert_allclose(float(logs["accuracy"]), history["accuracy"][0], rtol=1e-5)
    assert_same_variables(model.variables, reference.variables, **CROSS_GRAPH)


def test_sample_weights_match_keras_train_on_batch():
    model = SPEC.build(1)
    reference = keras_twin(
        model,
        keras.optimizers.Adam(0.01),
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    state = tp.TrainState.create(
        model=model, optimizer=keras.optimizers.Adam(0.01), weighted_metrics=accuracy()
    )
    step = tp.make_train_step(SCCE)
    for i in range(3):
        x, y = SPEC.batch(6, i)
        w = np.random.default_rng(i).uniform(0, 2, size=6).astype("float32")
        state.reset_metrics()  # one batch's figures on both sides
        state, logs = step(state, (x, y, w))
        reference.reset_metrics()  # (train_on_batch resets them itself only in newer Keras)
        keras_logs = reference.train_on_batch(x, y, sample_weight=w, return_dict=True)
    assert_same_variables(model.variables, reference.variables, **CROSS_GRAPH)
    np.testing.assert_allclose(float(logs["accuracy"]), keras_logs["accuracy"], rtol=1e-5)


def test_full_control_loss_equals_keras_loss():
    def full_control(model, batch, training):
        x, y = batch
        y_pred = model(x, training=training)
        return SCCE(y, y_pred), y_pred

    model = SPEC.build(2)
    other = twin(model)
    a, b = make_state(model), make_state(other)
    step_a, step_b = tp.make_train_step(full_control), tp.make_train_step(SCCE)
    for i in range(3):
        batch = SPEC.batch(5, i)
        a, logs_a = step_a(a, batch)
        b, logs_b = step_b(b, batch)
    assert_same_variables(model.variables, other.variables)
    assert {k: float(v) for k, v in logs_a.items()} == {k: float(v) for k, v in logs_b.items()}


def test_plain_function_and_name_losses_are_wrapped_like_compile():
    per_sample = functools.partial(keras.losses.sparse_categorical_crossentropy, from_logits=True)
    x, y = SPEC.batch(6, 0)
    model = SPEC.build(3)
    reference = keras_twin(model, keras.optimizers.SGD(0.1), loss=per_sample)
    state = make_state(model, keras.optimizers.SGD(0.1))
    state, logs = tp.make_train_step(per_sample)(state, (x, y))
    keras_logs = reference.train_on_batch(x, y, return_dict=True)
    np.testing.assert_allclose(float(logs["loss"]), keras_logs["loss"], rtol=1e-5)
    assert_same_variables(model.variables, reference.variables, **CROSS_GRAPH)

    mse_model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    mse_state = make_state(mse_model)
    target = np.zeros((3, 1), "float32")
    expected = float(np.mean(mse_model(np.ones((3, 2))).numpy() ** 2))
    _, mse_logs = tp.make_eval_step("mse")(mse_state, (np.ones((3, 2), "float32"), target))
    np.testing.assert_allclose(float(mse_logs["loss"]), expected, rtol=1e-5)


def test_dict_inputs_match_keras():
    a = keras.Input((2,), name="a")
    b = keras.Input((3,), name="b")
    out = keras.layers.Dense(2)(keras.layers.Concatenate()([a, b]))
    keras.utils.set_random_seed(0)
    model = keras.Model({"a": a, "b": b}, out)
    reference = keras_twin(model, keras.optimizers.SGD(0.1))
    state = make_state(model, keras.optimizers.SGD(0.1))
    rng = np.random.default_rng(0)
    x = {
        "a": rng.normal(size=(4, 2)).astype("float32"),
        "b": rng.normal(size=(4, 3)).astype("float32"),
    }
    y = np.array([0, 1, 1, 0], "int32")
    state, logs = tp.make_train_step(SCCE)(state, (x, y))
    keras_logs = reference.train_on_batch(x, y, return_dict=True)
    np.testing.assert_allclose(float(logs["loss"]), keras_logs["loss"], rtol=1e-5)
    assert_same_variables(model.variables, reference.variables, **CROSS_GRAPH)


def test_loss_scale_optimizer_matches_keras():
    model = SPEC.build(4)
    reference = keras_twin(model, keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.01)))
    state = make_state(model, keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.01)))
    step = tp.make_train_step(SCCE)
    for i in range(3):
        x, y = SPEC.batch(5, i)
        state, _ = step(state, (x, y))
        reference.train_on_batch(x, y)
    assert_same_variables(model.variables, reference.variables, **CROSS_GRAPH)
    assert float(state.optimizer.dynamic_scale) == float(reference.optimizer.dynamic_scale)


def test_eval_step_matches_keras_test_on_batch_and_is_pure():
    model = SPEC.build(5)
    reference = keras_twin(model, keras.optimizers.Adam(), metrics=["accuracy"])
    state = make_state(model)
    x, y = SPEC.batch(7, 0)
    tpt.assert_eval_step_pure(tp.make_eval_step(SCCE), state, (x, y))
    state.reset_eval_metrics()
    _, logs = tp.make_eval_step(SCCE)(state, (x, y))
    keras_logs = reference.test_on_batch(x, y, return_dict=True)
    assert float(logs["loss"]) == pytest.approx(keras_logs["loss"], rel=1e-5)
    assert float(logs["accuracy"]) == pytest.approx(keras_logs["accuracy"], rel=1e-5)
    assert float(state.metrics["loss"].count) == 0  # training figures untouched


def test_jit_compile_matches_graph():
    # Without Dropout: under XLA, TensorFlow's stateless RNG draws other masks.
    model = ModelSpec((5,), (("dense", 6), ("batchnorm", 0)), num_classes=3, l2=0.01).build(6)
    other = twin(model)
    a, b = make_state(model), make_state(other)
    graph, xla = tp.make_train_step(SCCE), tp.make_train_step(SCCE, jit_compile=True)
    for i, n in enumerate((6, 6, 2)):
        batch = SPEC.batch(n, i)
        a, logs_a = graph(a, batch)
        b, logs_b = xla(b, batch)
    assert_same_variables(model.variables, other.variables, **CROSS_GRAPH)
    np.testing.assert_allclose(float(logs_a["loss"]), float(logs_b["loss"]), rtol=1e-5)
    _, eval_a = tp.make_eval_step(SCCE)(a, batch)
    _, eval_b = tp.make_eval_step(SCCE, jit_compile=True)(b, batch)
    np.testing.assert_allclose(float(eval_a["loss"]), float(eval_b["loss"]), rtol=1e-5)


def test_batch_sizes_share_one_trace():
    state, step = make_state(SPEC.build(0)), tp.make_train_step(SCCE)
    for n in (8, 8, 3, 5, 1, 8, 2):
        state, _ = step(state, SPEC.batch(n, n))
    assert step.experimental_get_tracing_count() == 1  # traced for (None, 5) only
    x, y = SPEC.batch(4, 0)
    state, _ = step(state, (x, y, np.ones(4, "float32")))  # a new structure: traced once more
    state, _ = step(state, (x[:2], y[:2], np.ones(2, "float32")))
    assert step.experimental_get_tracing_count() == 2  # size-free from the start


def test_direct_calls_over_ten_sequence_lengths_trace_twice():
    """A varying sequence length widens the signature once (as reduce_retracing would); a
    feature size the model fixes is not widened, so its check still names it."""
    keras.utils.set_random_seed(0)
    tokens = keras.Input((None,), dtype="int32")
    h = keras.layers.LSTM(4)(keras.layers.Embedding(20, 4, mask_zero=True)(tokens))
    state = make_state(keras.Model(tokens, keras.layers.Dense(3)(h)))
    step = tp.make_train_step(SCCE)
    rng = np.random.default_rng(0)
    for n, length in zip((8, 8, 5, 8, 3, 8, 8, 2, 8, 8), range(3, 13), strict=True):
        batch = (rng.integers(1, 20, (n, length)).astype("int32"), rng.integers(0, 3, n))
        state, _ = step(state, batch)
    assert step.experimental_get_tracing_count() == 2  # (None, 3), then (None, None)
    fixed = make_state(SPEC.build(0))
    fixed, _ = step(fixed, SPEC.batch(4, 0))
    x, y = SPEC.batch(4, 1)
    with pytest.raises(ValueError, match=r"expected \(None, 5\).*got \(4, 7\)"):
        step(fixed, (np.concatenate([x, x[:, :2]], axis=1), y))


def test_replace_shares_handles_and_compiles_anew():
    state = make_state(SPEC.build(0))
    step = tp.make_train_step(SCCE)
    state, _ = step(state, SPEC.batch(4, 0))
    other = state.replace()
    assert other is not state and other.model is state.model
    other, _ = step(other, SPEC.batch(4, 1))
    assert int(state.step) == 2 and step.experimental_get_tracing_count() == 2


# -- non-finite guard ---------------------------------------------------------


def all_variables(state):
    return tpt.snapshot(
        [*state.model.variables, *state.optimizer.variables, state.step, state.skipped]
        + [v for m in state.metrics.values() for v in m.variables]
    )


def assert_unchanged(before, state):
    after = all_variables(state)
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)


def test_nonfinite_raise_names_step_and_changes_nothing():
    state, step = make_state(SPEC.build(0)), tp.make_train_step(SCCE)
    state, _ = step(state, SPEC.batch(4, 0))
    x, y = SPEC.batch(4, 1)
    x[2, 1] = np.nan
    before = all_variables(state)
    with pytest.raises(tp.NonFiniteError, match=r"at step 1 \(0-based\) the loss was nan"):
        step(state, (x, y))
    assert_unchanged(before, state)  # BatchNorm statistics and Dropout seed included


def test_nonfinite_skip_counts_and_continues():
    state, step = make_state(SPEC.build(0)), tp.make_train_step(SCCE, nonfinite="skip")
    x, y = SPEC.batch(4, 1)
    bad = x.copy()
    bad[0, 0] = np.inf
    before = all_variables(state)
    state, logs = step(state, (bad, y))
    assert int(logs["skipped"]) == 1 and int(state.step) == 1
    before["step:0"] = np.array(1)
    before["skipped:0"] = np.array(1)
    assert_unchanged(before, state)
    state, logs = step(state, (x, y))
    assert int(logs["skipped"]) == 1 and int(state.step) == 2
    assert float(state.metrics["loss"].count) == 4  # only the good batch counted


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_a_finite_batch_that_overflows_batchnorm_statistics_changes_nothing(nonfinite):
    """Loss and gradients are finite (the batch is normalised), but the moving variance of a
    feature of 1e30 overflows: the guard judges the state the step left."""
    spec = ModelSpec((5,), (("batchnorm", 0), ("dense", 6)), num_classes=3)
    state, step = make_state(spec.build(0)), tp.make_train_step(SCCE, nonfinite=nonfinite)
    x, y = spec.batch(4, 1)
    x[:, 0] = [1e30, -1e30, 1e30, 0.0]
    before = all_variables(state)
    if nonfinite == "raise":
        with pytest.raises(tp.NonFiniteError, match=r"left non-finite values in \[.*moving_var"):
            step(state, (x, y))
    else:
        state, logs = step(state, (x, y))
        assert int(logs["skipped"]) == 1
        before["step:0"], before["skipped:0"] = np.array(1), np.array(1)
    assert_unchanged(before, state)


def test_an_update_that_overflows_the_weights_is_refused_at_that_step():
    linear = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    state = make_state(linear, keras.optimizers.SGD(1e38))
    before = all_variables(state)
    with pytest.raises(
        tp.NonFiniteError,
        match=r"at step 0 \(0-based\) the loss was [\d.]+; every gradient finite, but the "
        r"step left non-finite values in \['sequential\w*/dense\w*/kernel'",
    ):
        x, y = SPEC.batch(4, 0)
        tp.make_train_step(SCCE)(state, (x * 10, y))  # gradients > 3.4: updates past 3.4e38
    assert_unchanged(before, state)


def test_an_epoch_of_skipped_batches_reports_nan_not_a_perfect_loss():
    x, y = SPEC.batch(12, 0)
    x[:] = np.nan
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    state = make_state(SPEC.build(0))
    _, history = tp.fit_loop(
        state, data, tp.make_train_step(SCCE, nonfinite="skip"), epochs=1, verbose=0
    )
    assert history["skipped"] == [3]
    assert np.isnan(history["loss"][0]) and np.isnan(history["accuracy"][0])


# -- bad input: a clear error, no variable changed ------------------------------


@pytest.mark.parametrize(
    ("batch", "error", "match"),
    [
        pytest.param(
            (np.ones((4, 5), "float32"),) * 4, ValueError, "tuple of 4 parts", id="four-parts"
        ),
        pytest.param(
            (np.ones((4, 7), "float32"), np.zeros(4, "int32")),
            ValueError,
            r"expected \(None, 5\).*got \(4, 7\)",
            id="feature-size",
        ),
        pytest.param(
            (np.ones((4, 5, 1), "float32"), np.zeros(4, "int32")),
            ValueError,
            r"expected \(None, 5\).*got \(4, 5, 1\)",
            id="feature-rank",
        ),
        pytest.param(np.ones((4, 5), "float32"), ValueError, "has no targets", id="no-targets"),
        pytest.param(
            (np.ones((4, 5), "float32"), np.zeros(3, "int32")),
            ValueError,
            "disagree on the number of examples",
            id="batch-sizes",
        ),
        pytest.param(
            ((np.ones((4, 5), "float32"), np.ones((4, 5), "float32")), np.zeros(4, "int32")),
            ValueError,
            "takes 1 input",
            id="two-inputs",
        ),
        pytest.param(
            (np.array([["a"] * 5] * 4), np.zeros(4, "int32")),
            (TypeError, ValueError),
            "string",
            id="string-features",
        ),
        pytest.param(
            (np.ones((4, 5), "float32"), np.array([0, 1, 7, 2], "int32")),
            tf.errors.InvalidArgumentError,
            "label value of 7",
            id="label-out-of-range",
        ),
    ],
)
def test_bad_batches_raise_before_any_variable_changes(batch, error, match):
    state, step = make_state(SPEC.build(0)), tp.make_train_step(SCCE)
    state, _ = step(state, SPEC.batch(4, 0))
    before = all_variables(state)
    with pytest.raises(error, match=match):
        step(state, batch)
    assert_unchanged(before, state)


class FailsBackward(keras.layers.Layer):
    """The identity forward; its gradient fails a run-time assertion."""

    def call(self, x):
        @tf.custom_gradient
        def identity(t):
            def grad(dy):
                failed = tf.debugging.Assert(tf.reduce_all(dy > 1e30), ["backward check failed"])
                with tf.control_dependencies([failed]):
                    return tf.identity(dy)

            return tf.identity(t), grad

        return identity(x)


def test_an_error_of_the_backward_pass_alone_is_raised_and_the_layers_below_it_keep_their_values():
    """The documented limit of the guard's barrier: the updates wait for the forward pass,
    not every gradient, so an error raised by a backward op alone may leave the updates
    of the layers above it written; the layers whose gradients pass it are unchanged."""
    keras.utils.set_random_seed(0)
    below = keras.layers.Dense(6, name="below")
    model = keras.Sequential([keras.Input((5,)), below, FailsBackward(), keras.layers.Dense(3)])
    state = make_state(model)
    step = tp.make_train_step(SCCE)
    state.optimizer.build(model.trainable_variables)
    slots = [v for v in state.optimizer.variables if "below" in v.path]
    watched = tpt.snapshot([*below.variables, *slots])
    assert len(watched) == 2 + 4  # kernel, bias and their two Adam slots each
    with pytest.raises(tf.errors.InvalidArgumentError, match="backward check failed"):
        step(state, SPEC.batch(4, 0))
    after = tpt.snapshot([*below.variables, *slots])
    for name, value in watched.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"loss": 3}, TypeError, "must be a keras.losses.Loss"),
        ({"loss": lambda y: y}, TypeError, "takes 1 required positional"),
        ({"loss": SCCE, "steps_per_call": 0}, ValueError, "steps_per_call"),
        ({"loss": SCCE, "nonfinite": "ignore"}, ValueError, "nonfinite"),
        ({"loss": SCCE, "jit_compile": "yes"}, TypeError, "jit_compile"),
        ({"loss": SCCE, "grad_transform": [3]}, TypeError, "grad_transform"),
    ],
)
def test_bad_factory_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        tp.make_train_step(**kwargs)


def test_step_needs_a_train_state():
    with pytest.raises(TypeError, match="takes a TrainState"):
        tp.make_train_step(SCCE)(SPEC.build(0), SPEC.batch(2, 0))


def test_full_control_loss_without_predictions_needs_no_metrics():
    def no_predictions(model, batch, training):
        x, y = batch
        return SCCE(y, model(x, training=training)), None

    state = make_state(SPEC.build(0))
    with pytest.raises(ValueError, match="need predictions"):
        tp.make_train_step(no_predictions)(state, SPEC.batch(3, 0))
    bare = tp.TrainState.create(model=SPEC.build(0), optimizer=keras.optimizers.SGD())
    bare, logs = tp.make_train_step(no_predictions)(bare, SPEC.batch(3, 0))
    assert sorted(logs) == ["loss"]


def test_nonfinite_none_applies_whatever_comes_out_like_the_tutorial():
    state, step = make_state(SPEC.build(0)), tp.make_train_step(SCCE, nonfinite=None)
    x, y = SPEC.batch(4, 1)
    x[0, 0] = np.nan
    state, logs = step(state, (x, y))
    assert np.isnan(float(logs["loss"])) and int(state.step) == 1
    assert any(np.isnan(v.numpy()).any() for v in state.model.trainable_variables)


@pytest.mark.parametrize(("nonfinite", "jit_compile"), [("raise", False), ("skip", True)])
def test_a_failed_loss_scaled_step_changes_no_variable_the_scale_included(nonfinite, jit_compile):
    """A NaN batch under a LossScaleOptimizer: its scale and counter are put back with the
    rest (a caller who retries must not halve the scale on every bad batch)."""
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.01))
    state = make_state(SPEC.build(4), optimizer)
    step = tp.make_train_step(SCCE, nonfinite=nonfinite, jit_compile=jit_compile)
    state, _ = step(state, SPEC.batch(5, 0))
    before = tpt.snapshot([*state.model.variables, *optimizer.variables])
    x, y = SPEC.batch(5, 1)
    x[2, 0] = np.nan
    if nonfinite == "raise":
        with pytest.raises(tp.NonFiniteError, match="No variable changed"):
            step(state, (x, y))
    else:
        state, logs = step(state, (x, y))
        assert int(logs["skipped"]) == 1
    after = tpt.snapshot([*state.model.variables, *optimizer.variables])
    assert int(state.step) == (2 if nonfinite == "skip" else 1)
    assert float(optimizer.dynamic_scale) == 2.0**15 and int(optimizer.step_counter) == 1
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)


@pytest.mark.parametrize(("nonfinite", "steps_per_call"), [("raise", 1), ("skip", 4)])
def test_a_label_out_of_range_under_xla_is_an_error_naming_it(nonfinite, steps_per_call):
    """XLA reports no label out of range itself (the loss turns NaN): the step checks the
    labels first, in every mode, so a data error is not taken for a numeric accident."""
    state = make_state(SPEC.build(4))
    step = tp.make_train_step(
        SCCE, nonfinite=nonfinite, jit_compile=True, steps_per_call=steps_per_call
    )
    x, y = SPEC.batch(16, 0)
    y[6] = 7  # 3 classes
    before = tpt.snapshot([*state.model.variables, state.step, state.skipped])
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)  # the label in batch 1
    if steps_per_call == 1:
        data = data.skip(1).take(1)
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=r"model sequential\w* has 3 classes, so labels must be in \[0, 3\); the batch "
        r"holds the labels\] \[7\]",
    ):
        tp.fold(step, state, data)
    after = tpt.snapshot([*state.model.variables, state.step, state.skipped])
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)


def test_the_history_counts_each_epochs_skipped_steps_and_a_resume_keeps_counting_them(
    tmp_path, monkeypatch
):
    """Batches 0 and 2 of 3 are poisoned: 2 skipped an epoch (the state counts them all).
    Preempted mid-epoch 2, right after a skipped batch, the resumed run reports the same."""
    x, y = SPEC.batch(12, 0)
    x[:4] = x[8:] = np.nan
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    step = tp.make_train_step(SCCE, nonfinite="skip")
    state = make_state(SPEC.build(0), seed=0)
    _, uninterrupted = tp.fit_loop(state, data, step, epochs=2, verbose=0)
    assert uninterrupted["skipped"] == [2.0, 2.0] and int(state.skipped) == 4
    count = preempted_after(4, monkeypatch)  # a SIGTERM as the run sees it
    first = make_state(SPEC.build(0), seed=0)
    with pytest.raises(tp.Preempted):
        tp.fit_loop(first, data, step, epochs=2, verbose=0, callbacks=[count],
                    checkpoint=tp.Checkpointer(tmp_path))  # fmt: skip
    monkeypatch.undo()
    assert int(first.skipped) == 3
    resumed = make_state(SPEC.build(0), seed=0)
    _, history = tp.fit_loop(
        resumed, data, step, epochs=2, verbose=0, checkpoint=tp.Checkpointer(tmp_path)
    )
    assert history == uninterrupted
