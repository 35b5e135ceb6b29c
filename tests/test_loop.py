"""fold, evaluate and fit_loop against Keras fit/evaluate and the tutorial loop."""

import csv
import subprocess
import sys
import textwrap
import threading
import weakref
from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpure as tp
from tfpure import stream
from tfpure import testing as tpt
from tfpure.testing.strategies import ModelSpec

from reference import documented_shuffle, preempted_after, tutorial_fit, twin

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
SPEC = ModelSpec((6,), (("dense", 8), ("dropout", 50), ("batchnorm", 0)), num_classes=3, l2=0.01)


def dataset(n=50, batch=16, seed=0):
    x, y = SPEC.batch(n, seed)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def make_state(model, lr=0.01):
    return tp.TrainState.create(
        model=model,
        optimizer=keras.optimizers.Adam(lr),
        metrics={"accuracy": keras.metrics.SparseCategoricalAccuracy()},
    )


def keras_twin(model, lr=0.01):
    reference = twin(model)
    reference.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss=SCCE,
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return reference


def test_fit_loop_history_equals_keras_fit_on_arrays():
    """Dropout, BatchNorm, L2 and a ragged last batch (50 = 3 x 16 + 2), with validation: the
    arrays as Keras `fit(x, y, batch_size=16, shuffle=False)` takes them; evaluate and predict
    on arrays too."""
    model = SPEC.build(0)
    reference = keras_twin(model)
    (x, y), val = SPEC.batch(50, 0), SPEC.batch(21, 1)
    expected = reference.fit(
        x, y, batch_size=16, epochs=3, validation_data=val, verbose=0, shuffle=False
    ).history
    state, history = tp.fit_loop(
        make_state(model), (x, y), tp.make_train_step(SCCE), epochs=3, val_data=val,
        batch_size=16, shuffle=False, verbose=0,
    )  # fmt: skip
    assert (
        sorted(history)
        == sorted(expected)
        == [
            "accuracy",
            "loss",
            "val_accuracy",
            "val_loss",
        ]
    )
    for name in expected:
        np.testing.assert_allclose(history[name], expected[name], rtol=1e-5, err_msg=name)
    for a, b in zip(model.variables, reference.variables, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    assert int(state.step) == 3 * 4
    scores = reference.evaluate(*val, batch_size=8, verbose=0, return_dict=True)
    got = tp.evaluate(state, val, tp.make_eval_step(SCCE), batch_size=8)
    assert got == pytest.approx(scores, rel=1e-5)
    np.testing.assert_allclose(
        tp.predict(state, val[0], batch_size=8),
        reference.predict(val[0], batch_size=8, verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )


def test_shuffled_arrays_follow_the_documented_order_and_a_resume_replays_it(tmp_path, monkeypatch):
    """shuffle=7 is the order tfpure.arrays documents (a stateless shuffle seeded by each
    epoch's draw of Dataset.random(seed=7)), bit for bit; a checkpointed run preempted
    mid-epoch 2 resumes to the same end."""
    x, y = SPEC.batch(50, 0)
    step = tp.make_train_step(SCCE)

    def run(data, **kwargs):
        state = make_state(SPEC.build(0))
        _, history = tp.fit_loop(state, data, step, epochs=2, verbose=0, **kwargs)
        return state, history

    # (A tf.data seed's draws depend on the global seed too: both runs set it to 0, as
    # `run`'s SPEC.build(0) does before fit_loop builds the arrays' dataset.)
    keras.utils.set_random_seed(0)
    ordered = documented_shuffle((x, y), 7).batch(16)
    expected, expected_history = run(ordered)
    shuffled, history = run((x, y), batch_size=16, shuffle=7)
    assert history == expected_history
    for a, b in zip(shuffled.model.variables, expected.model.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    count = preempted_after(6, monkeypatch)  # a SIGTERM as the run sees it
    with pytest.raises(tp.Preempted):
        run((x, y), batch_size=16, shuffle=7, callbacks=[count],
            checkpoint=tp.Checkpointer(tmp_path))  # fmt: skip
    monkeypatch.undo()
    resumed, history = run((x, y), batch_size=16, shuffle=7, checkpoint=tp.Checkpointer(tmp_path))
    assert history == expected_history
    for a, b in zip(resumed.model.variables, expected.model.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    with pytest.raises(TypeError, match=r"\A`batch_size=` slices arrays: `data` must be"):
        run(ordered, batch_size=16)
    with pytest.raises(ValueError, match=r"\AThe arrays of `data` must hold the same number"):
        run((x, y[:40]), batch_size=16)


def test_evaluate_equals_keras_evaluate():
    model = SPEC.build(1)
    reference = keras_twin(model)
    data = dataset(n=37, batch=10)
    expected = reference.evaluate(data, verbose=0, return_dict=True)
    got = tp.evaluate(make_state(model), data, tp.make_eval_step(SCCE))
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=1e-5), name


def test_fit_loop_equals_tutorial_loop():
    """Equal batches: the tutorial's mean of batch losses equals the per-example mean."""
    model = SPEC.build(2)
    reference = twin(model)
    data = dataset(n=48, batch=16)
    optimizer = keras.optimizers.Adam(0.01)
    optimizer.build(reference.trainable_variables)
    expected = tutorial_fit(reference, optimizer, SCCE, data, epochs=2)
    state, step = make_state(model), tp.make_train_step(SCCE)
    _, history = tp.fit_loop(state, data, step, epochs=2, verbose=0)
    np.testing.assert_allclose(history["loss"], [e[0] for e in expected], rtol=1e-5)
    assert history["accuracy"] == pytest.approx([e[1] for e in expected], rel=1e-5)
    for a, b in zip(model.variables, reference.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    # One step a call, nothing looking at the state between steps (verbose=0): windows of
    # straight-line steps, traced once for both epochs and judged together: over data of
    # known length, which lasts to each epoch's end, `Window.on_lasting`; over data of
    # unknown length, `Window.on_next`, which counts the batches its steps pull (to tell
    # the data's end from a step's own OutOfRangeError). Both equal the tutorial loop.
    state_u, step_u = make_state(SPEC.build(2)), tp.make_train_step(SCCE)
    unknown_length = data.filter(lambda *_: True)
    _, history_u = tp.fit_loop(state_u, unknown_length, step_u, epochs=2, verbose=0)
    assert history_u == history
    for a, b in zip(state_u.model.variables, reference.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    engine, counted = step.engine(state), step_u.engine(state_u)
    assert engine.window.on_lasting.experimental_get_tracing_count() == 1
    assert counted.window.on_next.experimental_get_tracing_count() == 1
    assert engine.window.on_next.experimental_get_tracing_count() == 0
    assert counted.window.on_lasting.experimental_get_tracing_count() == 0
    assert engine.on_next.experimental_get_tracing_count() == 0
    assert engine.on_iterator.experimental_get_tracing_count() == 0
    # Every op of a step that writes a variable waits for the batch, so the data's end
    # (get_next raising) comes before any write: in a window's step (the body's call,
    # the examples counted, the window's verdict so far; counted: and the count of
    # batches pulled) as in a step judged alone (`on_next`: 3 shadows saved, arming and
    # disarming, the examples counted, the body's call, the put-back and failure-record
    # branches).
    spec = tf.data.IteratorSpec(data.element_spec), tf.TensorSpec([], tf.int32)
    windows = [(engine.window.on_lasting, 3), (engine.window.on_next, 4)]
    for function, n in [*windows, (engine.on_next, 9)]:
        writes = [op for op in function.get_concrete_function(*spec).graph.get_operations()
                  if op.type in WRITES]  # fmt: skip
        assert len(writes) == n and all("IteratorGetNext" in ancestors(op) for op in writes)
    # The data's end: no step runs, nothing is written; a call asked for no step runs none.
    rollback = engine.rollback
    kept = [*rollback.covered, *(shadow for shadow, _ in rollback.pairs), rollback.armed]
    before = [v.numpy() for v in kept]
    for span in [False, True]:
        for run, n in [
            (step.runner(state, iter(data.take(0)), span=span), None),
            (step.runner(state, iter(data.take(0)), span=span), 16),
            (step.runner(state, iter(data), span=span), 0),
        ]:
            assert int(run(n)[1]) == 0
    assert int(state.step) == 6 and not rollback.armed.numpy()
    for v, value in zip(kept, before, strict=True):
        np.testing.assert_array_equal(v.numpy(), value)


def test_one_step_calls_are_judged_in_windows_only_while_no_callback_looks_at_steps(capsys):
    """At one step a call, `fit_loop` runs windows of calls (`Step.span`) when no batch
    hook listens but Keras' progress bar (verbose=1 draws it at each window's end, as
    Keras' fit does with steps_per_execution; verbose=2 only counts batches) and no action
    or save comes every fewer than 4 steps; it judges each step when a callback's batch
    hook listens (it then sees every step's logs) or an action comes every 3 steps
    (windows of 3 would cost more calls than the per-step guard). The results are the
    same bit for bit."""
    seen, ends = [], []

    class Batches(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(batch)

    every = [tp.every(n, lambda state, step, logs: None) for n in (3, 4)]
    for verbose, callbacks, actions, windowed in [
        (0, [], [], True), (2, [], every[1:], True), (1, [], [], True),
        (0, [Batches()], [], False), (0, [], every, False),  # an action every 3 steps
    ]:  # fmt: skip
        state, step = make_state(SPEC.build(4)), tp.make_train_step(SCCE)
        _, history = tp.fit_loop(state, dataset(n=40, batch=8), step, epochs=2,
                                 verbose=verbose, callbacks=callbacks,
                                 actions=actions)  # fmt: skip
        engine = step.engine(state)
        window = engine.window.on_lasting.experimental_get_tracing_count()
        assert engine.window.on_next.experimental_get_tracing_count() == 0
        assert (window, engine.on_next.experimental_get_tracing_count()) == (
            (1, 0) if windowed else (0, 1)
        ), verbose
        ends.append((history, [v.numpy() for v in state.model.variables]))
        out = capsys.readouterr().out
        assert verbose != 2 or out.count("5/5") == 2  # each epoch's line counts its batches
        assert verbose != 1 or out.count("5/5") >= 2  # the bar reaches every epoch's end
    assert seen == [0, 1, 2, 3, 4] * 2
    for history, variables in ends[1:]:
        assert history == ends[0][0]
        for a, b in zip(variables, ends[0][1], strict=True):
            np.testing.assert_array_equal(a, b)


WRITES = {"AssignVariableOp", "AssignAddVariableOp", "If", "StatefulPartitionedCall"}


def ancestors(op):
    """The types of the ops `op` waits for, through data and control edges."""
    seen, types, todo = set(), set(), [op]
    while todo:
        current = todo.pop()
        for parent in [t.op for t in current.inputs] + list(current.control_inputs):
            if parent.name not in seen:
                seen.add(parent.name)
                types.add(parent.type)
                todo.append(parent)
    return types


def test_fold_equals_calling_the_step_batch_by_batch():
    model = SPEC.build(3)
    other = twin(model)
    step = tp.make_train_step(SCCE)
    state, logs = tp.fold(step, make_state(model), dataset())
    by_hand = make_state(other)
    for batch in dataset():
        by_hand, hand_logs = step(by_hand, batch)
    assert {k: float(v) for k, v in logs.items()} == {k: float(v) for k, v in hand_logs.items()}
    for a, b in zip(model.variables, other.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    # fold does not reset metrics: a second pass keeps counting.
    state, _ = tp.fold(step, state, [SPEC.batch(4, 9)])
    assert float(state.metrics["loss"].count) == 50 + 4


def test_fit_loop_traces_each_step_once_over_epochs_with_ragged_last_batch():
    train, val = dataset(n=50), dataset(n=21, batch=8)
    train_step, eval_step = tp.make_train_step(SCCE), tp.make_eval_step(SCCE)
    tp.fit_loop(
        make_state(SPEC.build(0)),
        train,
        train_step,
        epochs=5,
        eval_step=eval_step,
        val_data=val,
        verbose=0,
    )
    assert train_step.experimental_get_tracing_count() == 1
    assert eval_step.experimental_get_tracing_count() == 1


class CountBatches(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.train, self.test, self.epochs = [], 0, 0

    def on_train_batch_end(self, batch, logs=None):
        self.train.append((batch, sorted(logs)))

    def on_test_batch_end(self, batch, logs=None):
        self.test += 1

    def on_epoch_end(self, epoch, logs=None):
        self.epochs += 1


def test_callbacks_see_what_keras_fit_shows_them():
    counter = CountBatches()
    tp.fit_loop(
        make_state(SPEC.build(0)),
        dataset(n=50),
        tp.make_train_step(SCCE),
        epochs=2,
        val_data=dataset(n=21, batch=8),
        callbacks=[counter],
        verbose=0,
    )
    assert [b for b, _ in counter.train] == [0, 1, 2, 3] * 2
    # Keras fit's figures, and the throughput since the previous call.
    assert counter.train[0][1] == ["accuracy", "examples_per_second", "loss", "steps_per_second"]
    assert counter.test == 3 * 2 and counter.epochs == 2


def test_early_stopping_stops_where_keras_fit_stops():
    def early():
        return keras.callbacks.EarlyStopping(monitor="val_loss", min_delta=10.0, patience=2)

    model = SPEC.build(4)
    reference = keras_twin(model)
    train, val = dataset(), dataset(n=20, seed=3)
    expected = reference.fit(
        train, epochs=10, validation_data=val, callbacks=[early()], verbose=0, shuffle=False
    )
    _, history = tp.fit_loop(
        make_state(model),
        train,
        tp.make_train_step(SCCE),
        epochs=10,
        val_data=val,
        callbacks=[early()],
        verbose=0,
    )
    assert len(history["loss"]) == len(expected.history["loss"]) == 3


def test_csv_logger_and_tensorboard_write_the_history(tmp_path):
    path = tmp_path / "log.csv"
    _, history = tp.fit_loop(
        make_state(SPEC.build(5)),
        dataset(),
        tp.make_train_step(SCCE),
        epochs=2,
        val_data=dataset(n=20, seed=3),
        callbacks=[
            keras.callbacks.CSVLogger(str(path)),
            keras.callbacks.TensorBoard(str(tmp_path / "tb")),
        ],
        verbose=0,
    )
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    for name, values in history.items():
        np.testing.assert_allclose([float(r[name]) for r in rows], values, rtol=1e-5)
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert {p.parent.name for p in events} == {"train", "validation"}


def test_learning_rate_callbacks_reach_the_state_optimizer():
    state = make_state(SPEC.build(6), lr=0.01)
    schedule = keras.callbacks.LearningRateScheduler(lambda epoch, lr: 0.1 / (epoch + 1))
    tp.fit_loop(
        state, dataset(), tp.make_train_step(SCCE), epochs=3, callbacks=[schedule], verbose=0
    )
    assert float(state.optimizer.learning_rate) == pytest.approx(0.1 / 3)


def test_progress_bar_prints_like_keras(capsys):
    tp.fit_loop(
        make_state(SPEC.build(0)),
        dataset(),
        tp.make_train_step(SCCE),
        epochs=2,
        val_data=dataset(n=20),
        verbose=1,
    )
    out = capsys.readouterr().out
    assert "Epoch 1/2" in out and "Epoch 2/2" in out
    assert "4/4" in out and "val_accuracy" in out


def test_fit_loop_drives_a_plain_python_step_over_a_list_of_batches():
    train_step = tp.make_train_step(SCCE)
    calls = []

    def logged_step(state, batch):
        calls.append(len(batch[0]))
        return train_step(state, batch)

    batches = [SPEC.batch(n, n) for n in (5, 5, 2)]
    _, history = tp.fit_loop(
        make_state(SPEC.build(0)),
        batches,
        logged_step,
        epochs=2,
        eval_step=tp.make_eval_step(SCCE),
        val_data=batches,
        verbose=0,
    )
    assert calls == [5, 5, 2] * 2 and len(history["val_loss"]) == 2


def test_steps_per_epoch_runs_a_repeating_dataset():
    state = make_state(SPEC.build(0))
    data = dataset(n=32, batch=8).repeat()
    _, history = tp.fit_loop(
        state, data, tp.make_train_step(SCCE), epochs=3, steps_per_epoch=5, verbose=0
    )
    assert int(state.step) == 15 and len(history["loss"]) == 3


# -- bad input ------------------------------------------------------------------


def snapshot(state):
    return tpt.snapshot([*state.model.variables, *state.optimizer.variables, state.step])


@pytest.mark.parametrize(
    ("data", "kwargs", "error", "match"),
    [
        (dataset(), {"epochs": 0}, ValueError, "epochs"),
        (dataset(), {"epochs": 1.5}, ValueError, "epochs"),
        (dataset().take(0), {}, ValueError, "held no batch"),
        (dataset().repeat(), {}, ValueError, "infinite"),
        (SPEC.batch(8, 0), {}, TypeError, r"For arrays, pass batch_size="),
        (dataset(), {"callbacks": ["csv"]}, TypeError, "keras.callbacks.Callback"),
        (dataset(), {"steps_per_epoch": 0}, ValueError, "steps_per_epoch"),
        (dataset(), {"eval_step": tp.make_train_step(SCCE), "val_data": dataset()}, ValueError, ""),
    ],
    ids=[
        "zero-epochs",
        "float-epochs",
        "empty",
        "infinite",
        "arrays",
        "callback",
        "steps-per-epoch",
        "train-as-eval",
    ],
)
def test_fit_loop_bad_arguments_change_nothing(data, kwargs, error, match):
    state = make_state(SPEC.build(0))
    before = snapshot(state)
    with pytest.raises(error, match=match or "training step"):
        tp.fit_loop(state, data, tp.make_train_step(SCCE), verbose=0, **kwargs)
    after = snapshot(state)
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)


def test_eval_step_passed_as_train_step_is_refused():
    with pytest.raises(ValueError, match="evaluation step"):
        tp.fit_loop(make_state(SPEC.build(0)), dataset(), tp.make_eval_step(SCCE), verbose=0)
    with pytest.raises(ValueError, match="training step"):
        tp.evaluate(make_state(SPEC.build(0)), dataset(), tp.make_train_step(SCCE))


def test_fold_and_evaluate_refuse_empty_data():
    state = make_state(SPEC.build(0))
    with pytest.raises(ValueError, match="no batch"):
        tp.fold(tp.make_train_step(SCCE), state, dataset().take(0))
    with pytest.raises(ValueError, match="no batch"):
        tp.evaluate(state, [], tp.make_eval_step(SCCE))


def test_batch_hooks_are_skipped_when_no_callback_listens():
    calls = []

    class EpochsOnly(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            calls.append(epoch)

    original = keras.callbacks.CallbackList.on_train_batch_end

    def counting(self, batch, logs=None):
        calls.append("batch")
        return original(self, batch, logs)

    args = (dataset(), tp.make_train_step(SCCE))
    with mock.patch.object(keras.callbacks.CallbackList, "on_train_batch_end", counting):
        tp.fit_loop(make_state(SPEC.build(0)), *args, epochs=2, callbacks=[EpochsOnly()], verbose=0)
        assert calls == [0, 1]
        tp.fit_loop(
            make_state(SPEC.build(0)), *args, epochs=1, callbacks=[CountBatches()], verbose=0
        )
        assert calls.count("batch") == 4


def test_fold_over_a_dataset_runs_eagerly_under_run_functions_eagerly():
    model = SPEC.build(7)
    other = twin(model)
    step = tp.make_train_step(SCCE, steps_per_call=3)
    tp.fold(step, make_state(model), dataset())
    tf.config.run_functions_eagerly(True)
    try:
        tp.fold(step, make_state(other), dataset())
    finally:
        tf.config.run_functions_eagerly(False)
    for a, b in zip(model.variables, other.variables, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)


def iterators_deleted_by_thread(monkeypatch):
    """Records, for every iterator the loops retire, the thread that deletes it."""

    deleted_by: list[str] = []
    retire = stream.retire

    def recording(refs):
        for ref in refs:
            if isinstance(ref, tf.data.Iterator):
                weakref.finalize(ref, lambda: deleted_by.append(threading.current_thread().name))
        retire(refs)

    monkeypatch.setattr(stream, "retire", recording)
    return deleted_by


@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "checkpointed"])
def test_finished_epoch_iterators_are_deleted_off_the_training_thread(
    monkeypatch, tmp_path, checkpoint
):
    """Deleting an autotuned iterator waits for the autotuner: the loop must not."""
    deleted_by = iterators_deleted_by_thread(monkeypatch)
    train = dataset().prefetch(tf.data.AUTOTUNE)
    val = dataset(n=21, batch=8, seed=1).prefetch(tf.data.AUTOTUNE)
    tp.fit_loop(
        make_state(SPEC.build(0)),
        train,
        tp.make_train_step(SCCE),
        epochs=3,
        val_data=val,
        verbose=0,
        checkpoint=tp.Checkpointer(tmp_path / "ckpt") if checkpoint else None,
    )
    tp.fold(tp.make_train_step(SCCE), make_state(SPEC.build(1)), train)
    assert stream.drain_retired(timeout=60)
    # Three training and three validation epochs, then the fold's pass.
    assert deleted_by == ["tfpure-iterator-reaper"] * 7


def test_a_python_step_over_a_dataset_retires_its_iterator_too(monkeypatch):
    deleted_by = iterators_deleted_by_thread(monkeypatch)
    step = tp.make_train_step(SCCE)
    _, logs = tp.fold(lambda s, b: step(s, b), make_state(SPEC.build(0)), dataset())
    assert stream.drain_retired(timeout=60)
    assert deleted_by == ["tfpure-iterator-reaper"]
    assert logs is not None


def test_the_process_waits_at_exit_for_iterators_being_deleted(tmp_path):
    """Python must not finalize while the reaper thread is still deleting an iterator."""
    done = tmp_path / "deleted"
    script = textwrap.dedent(
        f"""
        import time
        import tensorflow as tf
        from tfpure import resume, stream

        class SlowToDelete:
            def __del__(self):
                time.sleep(2)
                open({str(done)!r}, "w").close()

        stream.retire([iter(tf.data.Dataset.range(3)), SlowToDelete()])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert done.exists()
