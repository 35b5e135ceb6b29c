"""jit_compile="auto" / steps_per_call="auto": timed, chosen, put back, recorded, resumed."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpure as tp
import tfpure.auto
from tfpure.distribute import Task

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _state(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dropout(0.3),  # its seed state must be put back after the trial
            keras.layers.Dense(3),
        ]
    )
    return tp.TrainState.create(
        model=model,
        optimizer=keras.optimizers.Adam(0.01),
        metrics=[keras.metrics.SparseCategoricalAccuracy()],
    )


def _data(shuffle=False, n=96):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = rng.integers(0, 3, size=n).astype("int32")
    data = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        data = data.shuffle(n, seed=5)
    return data.batch(8)


def _same(a, b):
    for wa, wb in zip(a.model.get_weights(), b.model.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)
    for va, vb in zip(a.optimizer.variables, b.optimizer.variables, strict=True):
        np.testing.assert_array_equal(va.numpy(), vb.numpy())


def test_an_auto_run_is_the_chosen_configuration_s_run_bit_for_bit():
    auto = tp.make_train_step(LOSS, jit_compile="auto", steps_per_call="auto")
    assert auto.candidates == [(False, 1), (False, 16), (True, 1), (True, 16)]
    state, history = tp.fit_loop(_state(), _data(), auto, epochs=2, val_data=_data(n=32), verbose=0)
    # Every candidate was timed; the fastest median was chosen; the trial's 256 steps
    # left nothing behind: the state ran the run's 24 steps only.
    assert set(auto.timings) == set(auto.candidates)
    chosen = (auto.spec.jit_compile, auto.spec.steps_per_call)
    assert auto.timings[chosen] == min(auto.timings.values())
    assert int(state.step) == 24 and int(state.optimizer.iterations) == 24
    fixed = tp.make_train_step(LOSS, jit_compile=chosen[0], steps_per_call=chosen[1])
    ref, ref_history = tp.fit_loop(
        _state(), _data(), fixed, epochs=2, val_data=_data(n=32), verbose=0
    )
    _same(state, ref)
    assert history == ref_history
    assert auto(state, next(iter(_data())))[0] is state  # calls go to the chosen step


def test_auto_in_fold_and_evaluate_equals_the_chosen_configuration():
    def body(states, batch):  # two states, each trained on the batch
        x, y = batch
        out, logs = {}, {}
        for name, state in states.items():
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(LOSS(y, state.model(x, training=True)))
            grads = tape.gradient(loss, state.model.trainable_variables)
            out[name], logs[f"{name}_loss"] = state.apply_gradients(grads), loss
        return out, logs

    auto = tp.make_step(body, steps_per_call="auto")
    states, logs = tp.fold(auto, {"a": _state(0), "b": _state(1)}, _data())
    fixed = tp.make_step(body, steps_per_call=auto.spec.steps_per_call)
    ref, ref_logs = tp.fold(fixed, {"a": _state(0), "b": _state(1)}, _data())
    for name in ("a", "b"):
        _same(states[name], ref[name])
        # The body's means put back too.
        assert float(logs[f"{name}_loss"]) == float(ref_logs[f"{name}_loss"])
        assert int(states[name].step) == 12
    state = states["a"]

    evaluator = tp.make_eval_step(LOSS, steps_per_call="auto")
    scores = tp.evaluate(state, _data(n=40), evaluator)
    assert scores == tp.evaluate(state, _data(n=40), tp.make_eval_step(LOSS))
    assert set(evaluator.timings) == {(False, 1), (False, 16)}


def test_a_resumed_auto_run_takes_the_recorded_configuration_bit_for_bit(tmp_path, capsys):
    first = tp.make_train_step(LOSS, jit_compile="auto")
    tp.fit_loop(
        _state(), _data(True), first, epochs=1, verbose=2, checkpoint=tp.Checkpointer(tmp_path)
    )
    chosen = (first.spec.jit_compile, first.spec.steps_per_call)
    assert f"tfpure: chose jit_compile={chosen[0]}, steps_per_call=1 (timed: " in (
        capsys.readouterr().out
    )
    # A new process's objects: the run resumes at epoch 1 with the recorded configuration,
    # untimed, reading the trial batches as the first run did (the shuffle's next order).
    resumed = tp.make_train_step(LOSS, jit_compile="auto")
    state, history = tp.fit_loop(
        _state(), _data(True), resumed, epochs=3, verbose=0, checkpoint=tp.Checkpointer(tmp_path)
    )
    assert resumed.timings == {}
    assert (resumed.spec.jit_compile, resumed.spec.steps_per_call) == chosen
    whole, data, whole_state = tp.make_train_step(LOSS, jit_compile="auto"), _data(True), _state()
    whole.choose(whole_state, data, recorded=chosen)  # (its trial batches drawn from `data`)
    ref, ref_history = tp.fit_loop(whole_state, data, whole, epochs=3, verbose=0)
    _same(state, ref)
    assert history == ref_history


def test_auto_options_refuse_bad_values_and_calls_before_the_choice(monkeypatch):
    with pytest.raises(TypeError, match="`jit_compile` must be True, False or 'auto'"):
        tp.make_train_step(LOSS, jit_compile="fast")
    with pytest.raises(TypeError, match="`steps_per_call` must be an int >= 1 or 'auto'"):
        tp.make_eval_step(LOSS, steps_per_call="many")
    with pytest.raises(ValueError, match="steps_per_call"):  # the fixed option is checked too
        tp.make_train_step(LOSS, jit_compile="auto", steps_per_call=0)
    state = _state()
    auto = tp.make_train_step(LOSS, steps_per_call="auto")
    batch = next(iter(_data()))
    with pytest.raises(TypeError, match=r"step.choose\(state, dataset\)"):
        auto(state, batch)
    with pytest.raises(TypeError, match=r"tf\.data\.Dataset; got list"):
        tp.fold(auto, state, [batch])
    with pytest.raises(ValueError, match="held no batch: there is nothing to time"):
        auto.choose(state, _data().filter(lambda x, y: False))  # (its cardinality unknown)
    with monkeypatch.context() as patch:  # each worker of a cluster would time on its own
        patch.setattr(tfpure.auto, "cluster_task", lambda strategy: Task("worker", 1, False))
        with pytest.raises(ValueError, match="multi-worker strategy, pass jit_compile="):
            auto.choose(state, _data())
    with pytest.raises(ValueError, match="`train_step` is an evaluation step"):
        tp.fit_loop(state, _data(), tp.make_eval_step(LOSS, jit_compile="auto"), epochs=1)
    # A candidate failing in the trial: nothing the user trained changes.
    before = [w.copy() for w in state.model.get_weights()]
    x = np.full((16, 6), np.nan, "float32")
    bad = tf.data.Dataset.from_tensor_slices((x, np.zeros(16, "int32"))).batch(8)
    with pytest.raises(tp.NonFiniteError):
        tp.fit_loop(state, bad, auto, epochs=1, verbose=0)
    for a, b in zip(before, state.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(state.step) == 0 and auto.chosen is None


def test_auto_under_a_strategy_times_the_plain_graph_only():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        state = _state()
    auto = tp.make_train_step(LOSS, jit_compile="auto", steps_per_call="auto")
    state, history = tp.fit_loop(state, _data(), auto, epochs=1, verbose=0)
    assert set(auto.timings) == {(False, 1), (False, 16)} and not auto.spec.jit_compile
    with strategy.scope():
        ref = _state()
    fixed = tp.make_train_step(LOSS, steps_per_call=auto.spec.steps_per_call)
    ref, ref_history = tp.fit_loop(ref, _data(), fixed, epochs=1, verbose=0)
    _same(state, ref)  # every variable put back after the trial, replicas included
    assert history == ref_history
