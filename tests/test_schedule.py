"""Step budgets, evaluation windows, actions at exact steps, throughput (fit_loop(steps=...))."""

import glob
import signal

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpure as tp
from tfpure import resume, stream
from tfpure.schedule import THROUGHPUT

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def make_state(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, "relu"),
            keras.layers.Dropout(0.2),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(3),
        ]
    )
    return tp.TrainState.create(
        model=model,
        optimizer=keras.optimizers.Adam(0.01),
        metrics={"accuracy": keras.metrics.SparseCategoricalAccuracy()},
    )


def dataset(n=52, batch=8, seed=0, shuffle=False, order=3):
    """52 examples in batches of 8: 7 batches an epoch, the last one of 4 (shuffled:
    in the order of the seed `order`)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = rng.integers(0, 3, size=n).astype("int32")
    data = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        data = data.shuffle(n, seed=order)
    return data.batch(batch)


def variables(state):
    return [v.numpy() for v in [*state.model.variables, *state.optimizer.variables]]


def assert_identical(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


class Windows(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs, self.batch_logs, self.targets = [], [], []

    def on_epoch_begin(self, epoch, logs=None):
        self.targets.append(self.params["steps"])  # the progress bar's target

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append((epoch, dict(logs)))

    def on_train_batch_end(self, batch, logs=None):
        self.batch_logs.append(dict(logs))


def test_budget_with_eval_windows_and_an_action_at_exact_steps(tmp_path):
    """steps=100, eval_every=30, steps_per_call=16, an action every 7 steps, TensorBoard."""
    fired = []

    def record(state, step, logs):
        fired.append((step, int(state.step), logs))

    windows = Windows()
    state, history = tp.fit_loop(
        make_state(),
        dataset(),
        tp.make_train_step(SCCE, steps_per_call=16),
        steps=100,
        eval_every=30,
        val_data=dataset(n=20, seed=1),
        actions=[tp.every(7, record), tp.tensorboard_writer(tmp_path, 10)],
        callbacks=[windows],
        verbose=0,
    )
    assert [step for step, _, _ in fired] == list(range(7, 100, 7))
    assert all(step == seen for step, seen, _ in fired)  # the state after exactly that step
    assert int(state.step) == 100
    assert sorted(history) == ["accuracy", "loss", "val_accuracy", "val_loss"]  # no throughput
    assert all(len(values) == 4 for values in history.values())  # at 30, 60, 90 and 100
    assert [epoch for epoch, _ in windows.epochs] == [0, 1, 2, 3]
    assert windows.targets == [30, 30, 30, 10]
    for _, _, logs in fired:
        assert {"loss", "accuracy", *THROUGHPUT} <= set(logs)
        assert all(isinstance(v, float) for v in logs.values())
        assert logs["steps_per_second"] > 0 and logs["examples_per_second"] > 0
    # Every 7 steps is one pass over the data (6 batches of 8 and one of 4): 52 examples.
    for _, _, logs in fired:
        ratio = logs["examples_per_second"] / logs["steps_per_second"]
        assert ratio == pytest.approx(52 / 7, rel=1e-9)
    # Keras callbacks see the throughput too: per call, and per window.
    assert len(windows.batch_logs) > 100 // 16
    for logs in [*windows.batch_logs, *(logs for _, logs in windows.epochs)]:
        assert logs["steps_per_second"] > 0 and logs["examples_per_second"] > 0
    # TensorBoard scalars at the writer's steps; validation where a window ended.
    (events,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
    written: dict[str, list[int]] = {}
    for event in tf.compat.v1.train.summary_iterator(events):
        for value in event.summary.value:
            written.setdefault(value.tag, []).append(event.step)
    assert written["loss"] == written["steps_per_second"] == list(range(10, 101, 10))
    assert written["val_loss"] == [30, 60, 90, 100]


def test_budget_windows_equal_one_step_per_call_bit_for_bit():
    """steps=45 with steps_per_call=16 is steps_per_call=1: variables and history."""
    runs = []
    for k in (1, 16):
        state, history = tp.fit_loop(
            make_state(),
            dataset(shuffle=True),
            tp.make_train_step(SCCE, steps_per_call=k),
            steps=45,
            eval_every=20,
            val_data=dataset(n=20, seed=1),
            verbose=0,
        )
        runs.append((variables(state), history, int(state.step)))
    assert_identical(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1] and runs[0][2] == runs[1][2] == 45
    assert len(runs[0][1]["loss"]) == 3  # windows of 20, 20 and 5 steps


def test_a_budget_of_whole_epochs_equals_the_epoch_run(monkeypatch):
    """eval_every = the epoch length: each window is an epoch (the data repeated in order)."""
    retired = []

    def retire(refs):  # Every finished iterator goes to the background deleter.
        retired.extend(r for r in refs if isinstance(r, tf.data.Iterator))
        retire_now(refs)

    retire_now = stream.retire
    monkeypatch.setattr(stream, "retire", retire)
    epochs_state, epochs_history = tp.fit_loop(
        make_state(),
        dataset(),
        tp.make_train_step(SCCE),
        epochs=3,
        val_data=dataset(n=20),
        verbose=0,
    )
    retired.clear()
    steps_state, steps_history = tp.fit_loop(
        make_state(),
        dataset(),
        tp.make_train_step(SCCE, steps_per_call=4),
        steps=21,
        eval_every=7,
        val_data=dataset(n=20),
        verbose=0,
    )
    assert_identical(variables(epochs_state), variables(steps_state))
    assert epochs_history == steps_history
    # One iterator a validation, then the budget's one iterator (over the repeated data).
    assert len(retired) == 4
    assert retired[-1].element_spec == dataset().element_spec


def test_window_figures_are_running_means_over_the_window():
    """A window's loss is the per-example mean over its own steps, as a fresh fold's."""
    data = dataset(n=64)  # 8 full batches
    state, history = tp.fit_loop(
        make_state(), data, tp.make_train_step(SCCE), steps=12, eval_every=6, verbose=0
    )
    reference = make_state()
    step = tp.make_train_step(SCCE)
    batches = list(data.repeat().take(12))
    for window in range(2):
        reference.reset_metrics()
        for batch in batches[6 * window : 6 * window + 6]:
            reference, logs = step(reference, batch)
        assert history["loss"][window] == float(logs["loss"])
    assert_identical(variables(state), variables(reference))


def test_actions_in_epoch_runs_count_the_global_step_and_see_validation_at_window_ends():
    seen = []
    tp.fit_loop(
        make_state(),
        dataset(),  # 7 steps an epoch
        tp.make_train_step(SCCE, steps_per_call=3),
        epochs=3,
        val_data=dataset(n=20, seed=1),
        actions=[tp.every(7, lambda state, step, logs: seen.append((step, sorted(logs))))],
        verbose=0,
    )
    # Each epoch's last step: the action runs after validation and sees it.
    assert [step for step, _ in seen] == [7, 14, 21]
    assert all({"val_loss", "val_accuracy", "loss", *THROUGHPUT} <= set(names) for _, names in seen)


def gan_like_states():
    keras.utils.set_random_seed(0)
    a = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    b = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    return {
        "a": tp.TrainState.create(model=a, optimizer=keras.optimizers.SGD(0.1)),
        "b": tp.TrainState.create(model=b, optimizer=keras.optimizers.SGD(0.1)),
    }


def two_models(states, batch):
    x, y = batch
    out, logs = {}, {}
    for name in ("a", "b"):
        s = states[name]
        with tf.GradientTape() as tape:
            loss = SCCE(y, s.model(x, training=True))
        out[name] = s.apply_gradients(tape.gradient(loss, s.model.trainable_variables))
        logs[f"loss_{name}"] = loss
    return out, logs


def test_actions_with_a_user_written_step_over_several_states():
    seen, timed = [], []
    states, history = tp.fit_loop(
        gan_like_states(),
        dataset(),
        tp.make_step(two_models, steps_per_call=8),
        steps=30,
        eval_every=10,
        actions=[
            tp.every(4, lambda s, step, logs: seen.append((step, int(s["a"].step), logs))),
            tp.every(None, lambda s, step, logs: timed.append(step), seconds=1e-9),
        ],
        verbose=0,
    )
    assert [(step, a) for step, a, _ in seen] == [(n, n) for n in range(4, 31, 4)]
    # By time: after every call (cut at 4, 8, 10, 12, ... by the other action and the
    # windows), at a window's end once, after its evaluation.
    assert timed == [4, 8, 10, 12, 16, 20, 24, 28, 30]
    assert all("loss_b" in logs and logs["examples_per_second"] > 0 for _, _, logs in seen)
    assert int(states["b"].step) == 30 and len(history["loss_b"]) == 3


def test_iterables_are_repeated_for_a_budget_and_a_one_shot_one_runs_out():
    batches = list(dataset())  # 7 batches
    state, _ = tp.fit_loop(make_state(), batches, tp.make_train_step(SCCE), steps=10, verbose=0)
    assert int(state.step) == 10
    state = make_state()
    with pytest.raises(ValueError, match="ran out after 7 of the 10 steps"):
        tp.fit_loop(state, iter(batches), tp.make_train_step(SCCE), steps=10, verbose=0)


def test_checkpoint_saves_are_an_action_one_save_per_step(tmp_path, monkeypatch):
    ckpt = tp.Checkpointer(tmp_path, save_every_steps=10, max_to_keep=10)
    numbers = []
    save = tp.Checkpointer.save

    def counted(self, state, **kwargs):
        numbers.append(int(state.step))
        return save(self, state, **kwargs)

    monkeypatch.setattr(tp.Checkpointer, "save", counted)
    state, history = tp.fit_loop(
        make_state(),
        dataset(),
        tp.make_train_step(SCCE, steps_per_call=16),
        steps=45,
        eval_every=20,
        checkpoint=ckpt,
        verbose=0,
    )
    # Step saves at 10 and 30; at 20 and 40 the window's save; at 45 the end.
    assert numbers == [10, 20, 30, 40, 45]
    # A finished budget does nothing when run again.
    again, history_again = tp.fit_loop(
        make_state(1),
        dataset(),
        tp.make_train_step(SCCE, steps_per_call=16),
        steps=45,
        eval_every=20,
        checkpoint=tp.Checkpointer(tmp_path, save_every_steps=10, max_to_keep=10),
        verbose=0,
    )
    assert numbers == [10, 20, 30, 40, 45] and int(again.step) == 45
    assert history_again == history
    assert_identical(variables(again), variables(state))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": 2, "steps": 10}, "Give `epochs` or `steps`, not both"),
        ({"eval_every": 5}, "`eval_every` counts steps of a step budget"),
        ({"steps": 10, "steps_per_epoch": 5}, "a step budget .* has no epochs"),
        ({"steps": 0}, r"`steps` must be None or an int >= 1; got 0"),
        ({"steps": 10, "eval_every": 2.5}, r"`eval_every` must be None or an int >= 1"),
        ({"steps": 10, "actions": [print]}, "`actions` must hold tp.Action objects"),
    ],
)
def test_bad_schedules_are_refused_before_anything_changes(kwargs, message):
    state = make_state()
    before = variables(state)
    error = TypeError if "actions" in kwargs else ValueError
    with pytest.raises(error, match=message):
        tp.fit_loop(state, dataset(), tp.make_train_step(SCCE), verbose=0, **kwargs)
    assert_identical(before, variables(state))


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((0, print), {}, r"`n` must be None or an int >= 1; got 0"),
        ((None, print), {}, "needs `n` \\(steps\\) or `seconds`"),
        ((5, print), {"seconds": -1.0}, "`seconds` must be None or a number > 0"),
        ((5, "print"), {}, "must be callable"),
    ],
)
def test_bad_actions_are_refused(args, kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        tp.every(*args, **kwargs)


def test_sigterm_right_after_a_step_save_does_not_write_that_step_again(tmp_path, monkeypatch):
    numbers = []
    save, run_save = tp.Checkpointer.save, resume.Run.save

    def counted(self, state, **kwargs):
        numbers.append(int(state.step))
        return save(self, state, **kwargs)

    def then_sigterm(self, record, history, where):
        path = run_save(self, record, history, where)
        if record.step == 10:  # SIGTERM lands just after the step save at 10 returned
            self._on_sigterm(signal.SIGTERM, None)
        return path

    monkeypatch.setattr(tp.Checkpointer, "save", counted)
    monkeypatch.setattr(resume.Run, "save", then_sigterm)
    with pytest.raises(tp.Preempted) as preempted:
        tp.fit_loop(
            make_state(),
            dataset(),
            tp.make_train_step(SCCE, steps_per_call=4),
            steps=45,
            checkpoint=tp.Checkpointer(tmp_path, save_every_steps=10),
            verbose=0,
        )
    assert numbers == [10] and preempted.value.path.endswith("ckpt-10")


class Crash(keras.callbacks.Callback):
    """Ends the process's run (an exception) after the batch `at` of the first epoch."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.at:
            raise KeyboardInterrupt


def test_a_resume_mid_epoch_with_another_shuffle_seed_is_refused_and_changes_nothing(tmp_path):
    """Another seed passes every other data check, but replays other batches to the saved
    position: some examples would be trained twice, others never."""
    step, ckpt = tp.make_train_step(SCCE), tp.Checkpointer(tmp_path, save_every_steps=2)
    with pytest.raises(KeyboardInterrupt):
        tp.fit_loop(make_state(), dataset(shuffle=True), step, epochs=2, checkpoint=ckpt,
                    callbacks=[Crash(at=2)], verbose=0)  # fmt: skip
    assert ckpt.checkpoints()[0].endswith("ckpt-2")  # mid-epoch
    state = make_state()  # the same global seed: the shuffle's op seed alone differs
    before = variables(state)
    with pytest.raises(tp.CheckpointError, match=r"shuffle seeds 0/3\).*shuffle seeds 0/4\."):
        tp.fit_loop(state, dataset(shuffle=True, order=4), step, epochs=2,
                    checkpoint=tp.Checkpointer(tmp_path), verbose=0)  # fmt: skip
    assert_identical(variables(state), before)
    assert int(state.step) == 0


def test_a_budget_extended_with_the_same_windows_resumes_exactly(tmp_path):
    """steps=20 then steps=30 (eval_every=10) from its checkpoint is one run of 30."""
    step = tp.make_train_step(SCCE, steps_per_call=4)
    ckpt = tmp_path / "ckpt"
    kwargs = {"eval_every": 10, "val_data": dataset(n=20, seed=1), "verbose": 0}
    tp.fit_loop(make_state(), dataset(), step, steps=20, checkpoint=tp.Checkpointer(ckpt), **kwargs)
    with pytest.raises(tp.CheckpointError, match=r"over other data .*batch size 8.*batch size 16"):
        tp.fit_loop(  # a budget counts batches: another batch size cannot resume exactly
            make_state(1),
            dataset(batch=16),
            step,
            steps=30,
            checkpoint=tp.Checkpointer(ckpt),
            **kwargs,
        )
    resumed, history = tp.fit_loop(
        make_state(1), dataset(), step, steps=30, checkpoint=tp.Checkpointer(ckpt), **kwargs
    )
    whole, expected = tp.fit_loop(make_state(), dataset(), step, steps=30, **kwargs)
    assert int(resumed.step) == 30 and history == expected
    assert_identical(variables(resumed), variables(whole))


@pytest.mark.parametrize("longer", [60, 70])
def test_a_budget_whose_last_window_was_short_extended_equals_the_longer_run(tmp_path, longer):
    """steps=45 (windows 20, 20, 5), then steps=60 or 70: the short window goes on where it
    stopped; the state, and the history (each window once), are the longer run's."""
    step = tp.make_train_step(SCCE)
    kwargs = {"eval_every": 20, "val_data": dataset(n=20, seed=1), "verbose": 0}
    tp.fit_loop(make_state(), dataset(), step, steps=45, checkpoint=tp.Checkpointer(tmp_path),
                **kwargs)  # fmt: skip
    resumed, history = tp.fit_loop(make_state(1), dataset(), step, steps=longer,
                                   checkpoint=tp.Checkpointer(tmp_path), **kwargs)  # fmt: skip
    whole, expected = tp.fit_loop(make_state(), dataset(), step, steps=longer, **kwargs)
    assert int(resumed.step) == int(whole.step) == longer  # (was 45 for 60: 15 steps lost)
    assert history == expected and len(history["loss"]) == -(-longer // 20)
    assert_identical(variables(resumed), variables(whole))


def test_a_replay_that_runs_out_of_data_is_a_clear_error(tmp_path):
    """Data of unknown length (a filter) holding fewer batches than the saved position."""
    step = tp.make_train_step(SCCE)

    def run(keep, steps):
        data = dataset().filter(lambda x, y: keep)
        checkpoint = tp.Checkpointer(tmp_path)
        return tp.fit_loop(
            make_state(), data, step, steps=steps, eval_every=4, checkpoint=checkpoint, verbose=0
        )

    run(True, 8)
    with pytest.raises(tp.CheckpointError, match="ran out while replaying 8 batches"):
        run(False, 12)  # it spun forever (SIGTERM swallowed) when the data ran dry


@pytest.mark.parametrize(
    ("first", "others"),
    [
        ({"steps": 20, "eval_every": 10}, [{"steps": 20, "eval_every": 5}, {"epochs": 2}]),
        ({"epochs": 2}, [{"steps": 14}]),
    ],
    ids=["budget", "epochs"],
)
def test_a_resume_with_another_schedule_is_refused_and_changes_nothing(tmp_path, first, others):
    """Another eval_every, or epochs for a budget and back: the saved position means
    another step."""
    step = tp.make_train_step(SCCE)
    tp.fit_loop(
        make_state(), dataset(), step, checkpoint=tp.Checkpointer(tmp_path), verbose=0, **first
    )
    for then in others:
        state = make_state(1)
        before = variables(state)
        with pytest.raises(tp.CheckpointError, match=r"was written by a run in .* asks for"):
            tp.fit_loop(
                state, dataset(), step, checkpoint=tp.Checkpointer(tmp_path), verbose=0, **then
            )
        assert_identical(before, variables(state))
