"""Keras compile habits: the same compile arguments give Keras' fit / evaluate / predict figures.

Each model is built twice from one seed; Keras trains one with ``model.compile`` +
``fit``, tfpure the other with the same `loss`, `loss_weights`, `metrics` and
`weighted_metrics` given to `TrainState.create` and the step factories. History keys
and values (training and validation), weights, `evaluate` and `predict` are compared.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpure as tp
import tfpure.testing as tpt


def rng(*seed):
    """A generator of its own for each data set: a test's data do not depend on test order."""
    return np.random.default_rng(list(seed))


def compare(build, compile_args, data, val, *, epochs=2, lr=1e-2, predict_data=None):
    """Keras fit and tfpure fit_loop on twin models; returns tfpure's state and steps."""
    metric_args = {
        k: compile_args.pop(k) for k in ("metrics", "weighted_metrics") if k in compile_args
    }
    keras_model = build()
    keras_model.compile(keras.optimizers.Adam(lr), **compile_args, **metric_args)
    expected = keras_model.fit(
        data, epochs=epochs, validation_data=val, verbose=0, shuffle=False
    ).history
    model = build()
    state = tp.TrainState.create(model=model, optimizer=keras.optimizers.Adam(lr), **metric_args)
    train_step = tp.make_train_step(**compile_args)
    eval_step = tp.make_eval_step(**compile_args)
    state, history = tp.fit_loop(
        state, data, train_step, epochs=epochs, eval_step=eval_step, val_data=val, verbose=0
    )
    assert sorted(history) == sorted(expected)
    for key, values in expected.items():
        np.testing.assert_allclose(history[key], values, rtol=0, atol=1e-5, err_msg=key)
    for mine, theirs in zip(model.weights, keras_model.weights, strict=True):
        np.testing.assert_allclose(
            mine.numpy(), theirs.numpy(), rtol=0, atol=1e-6, err_msg=mine.path
        )
    scores = keras_model.evaluate(val, return_dict=True, verbose=0)
    got = tp.evaluate(state, val, eval_step)
    assert sorted(got) == sorted(scores)
    for key, value in scores.items():
        np.testing.assert_allclose(got[key], value, rtol=0, atol=1e-5, err_msg=key)
    inputs = val.map(lambda x, *_: x) if predict_data is None else predict_data
    predictions = tp.predict(state, inputs)
    tf.nest.map_structure(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
        predictions,
        keras_model.predict(inputs, verbose=0),
    )
    return state, train_step, history


# -- a two-input, two-output model with string preprocessing ---------------------------

WORDS = ["red", "green", "blue", "cyan"]


def two_in_two_out():
    keras.utils.set_random_seed(1)
    word = keras.Input((), dtype="string", name="word")
    num = keras.Input((3,), name="num")
    ids = keras.layers.StringLookup(vocabulary=WORDS)(word)
    h = keras.layers.Concatenate()([keras.layers.Embedding(len(WORDS) + 1, 4)(ids), num])
    h = keras.layers.Dense(8, activation="relu")(h)
    return keras.Model(
        {"word": word, "num": num},
        {
            "kind": keras.layers.Dense(3, name="kind")(h),
            "size": keras.layers.Dense(1, name="size")(h),
        },
    )


def two_in_two_out_data(n=70, batch=16, *, one_hot=False):  # 70 = 4 x 16 + 6: ragged
    r = rng(n, batch)
    x = {"word": r.choice(WORDS, n), "num": r.normal(size=(n, 3)).astype("float32")}
    kind = r.integers(0, 3, n)
    kind = np.eye(3, dtype="float32")[kind] if one_hot else kind
    y = {"kind": kind, "size": r.normal(size=(n, 1)).astype("float32")}
    w = r.uniform(0.0, 2.0, n).astype("float32")
    return tf.data.Dataset.from_tensor_slices((x, y, w)).batch(batch)


def test_two_inputs_two_outputs_dict_losses_weights_and_metrics_equal_keras():
    data, val = two_in_two_out_data(), two_in_two_out_data(40)
    args = dict(
        loss={"kind": keras.losses.SparseCategoricalCrossentropy(from_logits=True), "size": "mse"},
        loss_weights={"kind": 1.0, "size": 0.5},
        metrics={"kind": "accuracy"},
        weighted_metrics={"kind": ["accuracy"], "size": ["mae"]},
    )
    state, _, history = compare(two_in_two_out, args, data, val)
    # Keras' names: per output, a weighted copy of a taken name, each output's loss.
    assert sorted(k for k in history if not k.startswith("val_")) == [
        "kind_accuracy", "kind_loss", "kind_weighted_accuracy", "loss", "size_loss", "size_mae",
    ]  # fmt: skip
    assert history["kind_accuracy"] != history["kind_weighted_accuracy"]  # the weights count
    assert state.routes["size_mae"] == tp.outputs.Route("size", 1, weighted=True)


def test_one_loss_and_a_list_of_losses_on_two_outputs_equal_keras():
    data, val = two_in_two_out_data(one_hot=True), two_in_two_out_data(40, one_hot=True)
    # One loss for every output ("accuracy" of one-hot labels is categorical); then a
    # list in output order (the dict's sorted keys).
    args = dict(loss="mse", metrics={"kind": "accuracy", "size": "mae"})
    _, _, history = compare(two_in_two_out, args, data, val, epochs=1)
    assert {"kind_loss", "size_loss", "kind_accuracy", "size_mae"} < set(history)
    compare(
        two_in_two_out,
        dict(loss=["mse", "mae"], loss_weights=[0.25, 2.0], metrics=[["accuracy"], None]),
        data,
        val,
        epochs=1,
    )


# -- a Transformer block with sample weights ---------------------------------------------


def transformer():
    keras.utils.set_random_seed(2)
    tokens = keras.Input((8,), dtype="int32")
    h = keras.layers.Embedding(20, 16)(tokens)
    attended = keras.layers.MultiHeadAttention(2, 8, dropout=0.1)(h, h)
    h = keras.layers.LayerNormalization()(h + attended)
    h = keras.layers.LayerNormalization()(h + keras.layers.Dense(16, activation="relu")(h))
    pooled = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(tokens, keras.layers.Dense(2)(keras.layers.Dropout(0.2)(pooled)))


def test_transformer_block_with_sample_weights_equals_keras():
    def data(n):
        r = rng(n)
        x = r.integers(0, 20, (n, 8)).astype("int32")
        y = (x[:, 0] > 9).astype("int32")
        return tf.data.Dataset.from_tensor_slices((x, y, r.uniform(0, 3, n).astype("float32")))

    args = dict(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        weighted_metrics=["accuracy"],
    )
    _, _, history = compare(transformer, args, data(72).batch(16), data(32).batch(16))
    assert "weighted_accuracy" in history and "val_weighted_accuracy" in history


# -- an LSTM over padded batches ----------------------------------------------------------


def lstm():
    keras.utils.set_random_seed(3)
    tokens = keras.Input((None,), dtype="int32")
    h = keras.layers.Embedding(12, 8, mask_zero=True)(tokens)
    return keras.Model(tokens, keras.layers.Dense(1, activation="sigmoid")(keras.layers.LSTM(8)(h)))


def padded(n, seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 12, n)
    rows = [rng.integers(1, 12, length).astype("int32") for length in lengths]
    labels = np.array([float(r.sum() % 2) for r in rows], "float32")[:, None]
    data = tf.data.Dataset.from_generator(
        lambda: zip(rows, labels, strict=True),
        output_signature=(tf.TensorSpec([None], tf.int32), tf.TensorSpec([1], tf.float32)),
    )
    return data.apply(tf.data.experimental.assert_cardinality(n)).padded_batch(8)


def test_lstm_over_padded_batches_equals_keras_and_traces_once():
    # "crossentropy" and "accuracy" resolve to their binary forms from the shapes.
    args = dict(loss="crossentropy", metrics=["accuracy"])
    _, train_step, history = compare(lstm, args, padded(44, 0), padded(20, 1))
    assert sorted(history) == ["accuracy", "loss", "val_accuracy", "val_loss"]
    assert train_step.experimental_get_tracing_count() == 1  # every sequence length, one trace


# -- MobileNetV3Small ------------------------------------------------------------------------


def mobilenet():
    keras.utils.set_random_seed(4)
    return keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), weights=None, classes=10, include_preprocessing=False
    )


def test_mobilenet_v3_small_equals_keras():
    def data(n):
        r = rng(n)
        x = r.uniform(0, 1, (n, 32, 32, 3)).astype("float32")
        return tf.data.Dataset.from_tensor_slices((x, r.integers(0, 10, n))).batch(8)

    compare(
        mobilenet,
        dict(loss="sparse_categorical_crossentropy", metrics=["accuracy"]),
        data(24),
        data(16),
        epochs=1,
        lr=1e-3,
    )


# -- what cannot be mapped ------------------------------------------------------------------


def test_structures_that_name_no_output_are_refused_naming_the_outputs():
    model = two_in_two_out()
    sgd = keras.optimizers.SGD
    with pytest.raises(ValueError, match=r"\['colour'\] name no output.*\['kind', 'size'\]"):
        tp.TrainState.create(
            model=model, optimizer=sgd(), metrics={"kind": "accuracy", "colour": "mae"}
        )
    with pytest.raises(ValueError, match=r"list of 3 entries.*\['kind', 'size'\]"):
        tp.TrainState.create(model=model, optimizer=sgd(), metrics=["mae", "mae", "mae"])
    with pytest.raises(ValueError, match="not a Keras metric"):
        tp.TrainState.create(model=model, optimizer=sgd(), metrics={"kind": "no_such_metric"})
    state = tp.TrainState.create(model=model, optimizer=sgd())
    before = [v.numpy() for v in model.weights]
    batch = next(iter(two_in_two_out_data()))
    for loss, weights, match in [
        ({"kind": "mse", "shape": "mae"}, None, r"\['shape'\] name no output"),
        (["mse"], None, r"list of 1 entries for a model with outputs \['kind', 'size'\]"),
        ("mse", 0.5, "one number for a model with outputs"),
        ("mse", {"kind": 1.0, "colour": 2.0}, r"`loss_weights` is keyed.*\['colour'\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            tp.make_train_step(loss, loss_weights=weights)(state, batch)
    for mine, old in zip(model.weights, before, strict=True):
        np.testing.assert_array_equal(mine.numpy(), old)
    assert int(state.step) == 0
    with pytest.raises(ValueError, match="not a Keras loss name"):
        tp.make_train_step({"kind": "no_such_loss"})
    with pytest.raises(ValueError, match="full-control loss"):
        tp.make_train_step(lambda model, batch, training: (0.0, None), loss_weights=[1.0])


def test_metrics_ignore_sample_weights_and_weighted_metrics_use_them():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    state = tp.TrainState.create(
        model=model,
        optimizer=keras.optimizers.SGD(0.0),
        metrics={"acc": keras.metrics.SparseCategoricalAccuracy()},  # tfpure's name -> metric
        weighted_metrics=["accuracy"],
    )
    model.set_weights([np.array([[1.0, 0.0], [0.0, 1.0]], "float32"), np.zeros(2, "float32")])
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], "float32")  # predicts 0, 1, 0
    y, w = np.array([0, 0, 1]), np.array([3.0, 1.0, 0.0], "float32")  # right, wrong, wrong
    _, logs = tp.make_train_step(keras.losses.SparseCategoricalCrossentropy(from_logits=True))(
        state, (x, y, w)
    )
    assert float(logs["acc"]) == pytest.approx(1 / 3)  # unweighted
    assert float(logs["accuracy"]) == pytest.approx(3 / 4)  # weighted


def test_a_metric_wrapping_a_lambda_gets_its_own_evaluation_copy():
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    gap = keras.metrics.MeanMetricWrapper(lambda t, p: tf.abs(t - p), name="gap")
    state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD(), metrics=[gap])
    assert state.eval_metrics["gap"] is not gap and state.metrics["gap"] is gap
    batch = (np.ones((2, 1), "float32"), np.full((2, 1), 5.0, "float32"))
    state, logs = tp.make_eval_step("mse")(state, batch)
    assert float(logs["gap"]) == pytest.approx(float(np.abs(5.0 - model(batch[0]).numpy()).mean()))
    assert float(state.metrics["gap"].count) == 0  # training figures untouched


def test_a_skipped_step_leaves_each_outputs_loss_as_it_was():
    model = two_in_two_out()
    state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD(0.01))
    kind = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    step = tp.make_train_step({"kind": kind, "size": "mae"}, nonfinite="skip")
    x, y, w = next(iter(two_in_two_out_data()))
    state, logs = step(state, (x, y, w))
    before = {k: float(v) for k, v in logs.items()}
    bad = {**y, "size": tf.fill(tf.shape(y["size"]), float("nan"))}
    state, logs = step(state, (x, bad, w))
    assert int(logs["skipped"]) == 1
    assert {k: float(v) for k, v in logs.items() if k != "skipped"} == {
        k: v for k, v in before.items() if k != "skipped"
    }
    assert len(step.log_variables(state)) == 4  # each output's tracker: total and count


def test_repeated_metric_names_are_numbered_as_keras_numbers_them():
    def build():
        keras.utils.set_random_seed(5)
        return keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])

    args = dict(metrics=["mae", "mae", keras.metrics.MeanSquaredError(name="mse")],
                weighted_metrics=["mae", "mse"])  # fmt: skip
    r = rng(12)
    data = tf.data.Dataset.from_tensor_slices(
        (r.normal(size=(12, 3)).astype("float32"), r.normal(size=(12, 1)).astype("float32"),
         r.uniform(0, 2, 12).astype("float32"))
    ).batch(4)  # fmt: skip
    state, _, _ = compare(build, dict(loss="mse", **args), data, data, epochs=1)
    assert list(state.metrics) == ["loss", "mae", "mae_1", "mse", "weighted_mae", "weighted_mse"]


def test_a_metric_of_every_output_at_once_that_fails_says_to_key_it_by_output():
    model = two_in_two_out()
    state = tp.TrainState.create(
        model=model,
        optimizer=keras.optimizers.SGD(),
        metrics={"acc": keras.metrics.SparseCategoricalAccuracy()},  # whole y: a dict
    )
    with pytest.raises((TypeError, ValueError), match=r"got every output.*keyed by output name"):
        tp.make_train_step({"kind": "mse", "size": "mse"})(state, next(iter(two_in_two_out_data())))
    assert int(state.step) == 0


def test_the_default_eval_step_keeps_the_loss_weights_and_fused_calls_change_nothing():
    data = two_in_two_out_data()
    loss = {"kind": keras.losses.SparseCategoricalCrossentropy(from_logits=True), "size": "mse"}
    weights = {"kind": 1.0, "size": 0.25}

    def make_state():
        return tp.TrainState.create(
            model=two_in_two_out(), optimizer=keras.optimizers.Adam(1e-2), metrics={"kind": "acc"}
        )

    # fit_loop's own eval step (no eval_step=) scores validation as Keras evaluate does.
    state, history = tp.fit_loop(
        make_state(), data, tp.make_train_step(loss, loss_weights=weights), val_data=data, verbose=0
    )
    state.model.compile(loss=loss, loss_weights=weights, metrics={"kind": "acc"})
    scores = state.model.evaluate(data, return_dict=True, verbose=0)
    for key in ("loss", "kind_loss", "size_loss", "kind_acc"):
        np.testing.assert_allclose(history[f"val_{key}"][-1], scores[key], atol=1e-6, err_msg=key)
    # Each output's loss tracker, fused: bit for bit the history of single steps.
    tpt.assert_fused_matches_sequential(
        make_state,
        lambda k: tp.make_train_step(loss, loss_weights=weights, steps_per_call=k),
        data,
        steps_per_call=3,
    )
