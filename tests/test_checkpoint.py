"""Checkpointer: exact resume after SIGKILL or SIGTERM, crash-safe restore, clear refusals."""

import functools
import json
import signal
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpure as tp
from tfpure import testing as tpt
from tfpure.testing.strategies import ModelSpec

WORKER = Path(__file__).with_name("resume_worker.py")
SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
SPEC = ModelSpec((5,), (("dense", 6), ("dropout", 50), ("batchnorm", 0)), num_classes=3, l2=0.01)


# Each case: (kill point, options). Every kill point runs in a process of its own;
# one more process then resumes them all, and runs the uninterrupted references.
BUDGET = ["--steps", "45", "--eval-every", "20"]  # windows of 20, 20 and 5 steps
XLA = ["--jit", "--steps-per-call", "4"]
KILLS = {
    "after-epoch-boundary": ("epoch:2", []),
    "right-after-a-save": ("after_save:3", []),
    "during-a-save": ("during_save:3", []),
    # Two SIGTERMs at step 13, one more while the preempted process winds down: 143.
    "sigterm-preemption": ("sigterm2:13", []),
    "two-states-fused-calls": ("step:14", ["--gan", "--steps-per-call", "4"]),
    "step-budget-fused-mid-window": ("step:39", [*BUDGET, "--steps-per-call", "4"]),
    # XLA, 4 steps per call in one XLA loop: calls cut by the saves every 5 steps and by
    # the ragged last batch of each epoch.
    "xla-loop-fused-calls": ("step:14", XLA),
}
# The uninterrupted run each case must equal (one step per call; XLA: as the killed run,
# since an XLA loop of 4 steps may round otherwise than single steps).
REFERENCES = {"reference": [], "reference-gan": ["--gan"], "reference-budget": BUDGET,
              "reference-xla": XLA}  # fmt: skip


def reference_of(options):
    if "--jit" in options:
        return "reference-xla"
    if "--gan" in options:
        return "reference-gan"
    return "reference-budget" if "--steps" in options else "reference"


def launch(*args):
    return subprocess.Popen(
        [sys.executable, str(WORKER), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def load(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def output(base, name):
    """What the run `name` saved; the test fails with that run's error if it failed."""
    error = base / f"{name}.npz.error"
    if error.exists():
        pytest.fail(f"the run {name!r} failed:\n{error.read_text()[-3000:]}")
    return load(base / f"{name}.npz")


@pytest.fixture(scope="session")  # session: never torn down between a worker's modules
def runs(tmp_path_factory):
    """Kills every case, then resumes them all (and runs the references), in one process.

    The kills run in children forked from the worker process (see `resume_worker.py
    --fork`): real SIGKILLs of real processes, without an interpreter start each.
    """
    base = tmp_path_factory.mktemp("kills")
    kills = [[name, str(base / name), str(base / f"{name}.first.npz"), ["--kill", kill, *options]]
             for name, (kill, options) in KILLS.items()]  # fmt: skip
    jobs = [[str(base / name), str(base / f"{name}.npz"), options]
            for name, (_, options) in KILLS.items()]  # fmt: skip
    for ref, options in REFERENCES.items():
        jobs.append([str(base / ref), str(base / f"{ref}.npz"), options])
    # A finished run, run again, does nothing (two states and budgets: test_examples.py,
    # test_schedule.py, in-process).
    jobs.append([str(base / "reference"), str(base / "reference.again.npz"), []])
    (base / "kills.json").write_text(json.dumps(kills))
    (base / "jobs.json").write_text(json.dumps(jobs))
    done = launch("--fork", base / "kills.json", base / "killed.json", base / "jobs.json")
    _, err = done.communicate(timeout=900)
    assert done.returncode == 0, err[-3000:]
    killed = {name: tuple(v) for name, v in json.loads((base / "killed.json").read_text()).items()}
    return base, killed


# `--dist loadfile` (pyproject.toml) runs a file's tests on one worker: the `runs`
# fixture runs once.
@pytest.mark.parametrize("name", list(KILLS))
def test_killed_and_restarted_run_equals_uninterrupted_run(runs, name):
    """Bit-identical variables, optimizer slots, seeds, step counts and history."""
    base, killed = runs
    code, err = killed[name]
    kill, options = KILLS[name]
    if kill.startswith("sigterm"):
        assert code == 143, err[-2000:]
        assert "SIGTERM received; saved" in err
        assert "Traceback" not in err
    else:
        assert code == -signal.SIGKILL, err[-2000:]
    assert not (base / f"{name}.first.npz").exists()
    resumed = output(base, name)
    uninterrupted = output(base, reference_of(options))
    steps = [k for k in uninterrupted if k.endswith("step")]
    assert steps and all(int(uninterrupted[k]) == (45 if "--steps" in options else 4 * 8)
                         for k in steps)  # fmt: skip
    assert sorted(resumed) == sorted(uninterrupted)
    if "fired" in uninterrupted:
        # Actions ran at the steps of the uninterrupted run, from the restored step on,
        # each seeing the state after exactly that step.
        everywhere, after_resume = uninterrupted.pop("fired"), resumed.pop("fired")
        assert [n for n, _ in everywhere] == list(range(3, 46, 3))
        assert (everywhere[:, 0] == everywhere[:, 1]).all()
        assert 0 < len(after_resume) < len(everywhere)
        np.testing.assert_array_equal(after_resume, everywhere[-len(after_resume) :])
    for key, value in uninterrupted.items():
        np.testing.assert_array_equal(resumed[key], value, err_msg=key)


def test_a_finished_run_does_nothing_when_run_again(runs):
    base, _ = runs
    first, later = output(base, "reference"), output(base, "reference.again")
    assert sorted(first) == sorted(later)
    for key, value in first.items():
        np.testing.assert_array_equal(later[key], value, err_msg=key)


# -- in-process: restore picks complete, readable, matching checkpoints -------------


def make_state(spec=SPEC, seed=0):
    return tp.TrainState.create(
        model=spec.build(seed),
        optimizer=keras.optimizers.Adam(0.01),
        metrics={"accuracy": keras.metrics.SparseCategoricalAccuracy()},
    )


def everything(state):
    return tpt.snapshot(
        [*state.model.variables, *state.optimizer.variables, state.step, state.rng.state]
    )


def train_some(state, n=3, seed=0):
    step = tp.make_train_step(SCCE)
    for i in range(n):
        state, _ = step(state, SPEC.batch(4, seed + i))
    return state


def test_manual_save_and_restore_round_trip(tmp_path):
    state = train_some(make_state())
    ckpt = tp.Checkpointer(tmp_path)
    path = ckpt.save(state)
    saved = everything(state)
    train_some(state, seed=10)
    assert ckpt.restore(state) == path
    for name, value in saved.items():
        np.testing.assert_array_equal(everything(state)[name], value, err_msg=name)
    assert ckpt.checkpoints() == [path]


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    state = train_some(make_state())
    ckpt = tp.Checkpointer(tmp_path)
    first = ckpt.save(state)
    at_first = everything(state)
    train_some(state, seed=10)
    latest = ckpt.save(state)
    data = Path(latest + ".data-00000-of-00001")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    train_some(state, seed=20)
    with pytest.warns(RuntimeWarning, match="does not read back"):
        assert ckpt.restore(state) == first
    for name, value in at_first.items():
        np.testing.assert_array_equal(everything(state)[name], value, err_msg=name)


DAMAGES = {
    "deleted": None,
    "garbled": lambda text: "\x00\xff not a checkpoint state {",
    "truncated": lambda text: text[: text.index('"') + 4],  # inside the first path
    "emptied": lambda text: "",
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_state_file_is_rebuilt_from_the_checkpoint_files(tmp_path, damage):
    state = train_some(make_state())
    ckpt = tp.Checkpointer(tmp_path)
    ckpt.save(state)
    train_some(state, seed=10)
    latest = ckpt.save(state)
    saved = everything(state)
    index = tmp_path / "checkpoint"
    if DAMAGES[damage] is None:
        index.unlink()
    else:
        index.write_text(DAMAGES[damage](index.read_text()), encoding="latin-1")
    other = make_state(seed=1)
    again = tp.Checkpointer(tmp_path)
    with pytest.warns(RuntimeWarning, match="state file .* is missing or damaged"):
        assert again.restore(other) == latest  # never taken for an empty directory
    restored = everything(other)
    assert len(restored) == len(saved)
    for (name, value), mine in zip(saved.items(), restored.values(), strict=True):
        np.testing.assert_array_equal(mine, value, err_msg=name)
    train_some(other, seed=20)
    newest = again.save(other)  # the rebuilt index goes on
    assert tp.Checkpointer(tmp_path).checkpoints() == [newest, latest, str(tmp_path / "ckpt-3")]


def test_no_readable_checkpoint_is_a_clear_error_and_changes_nothing(tmp_path):
    state = train_some(make_state())
    ckpt = tp.Checkpointer(tmp_path)
    path = ckpt.save(state)
    Path(path + ".index").write_bytes(b"not a checkpoint")
    train_some(state, seed=10)
    before = everything(state)
    with pytest.warns(RuntimeWarning), pytest.raises(tp.CheckpointError, match="can be restored"):
        ckpt.restore(state)
    for name, value in before.items():
        np.testing.assert_array_equal(everything(state)[name], value, err_msg=name)


def test_a_checkpoint_of_another_architecture_is_refused_by_name(tmp_path):
    tp.Checkpointer(tmp_path).save(make_state())
    wider = ModelSpec((5,), (("dense", 9), ("dropout", 50), ("batchnorm", 0)), num_classes=3)
    other = make_state(wider)
    before = everything(other)
    with pytest.raises(tp.CheckpointError, match=r"model variable 0.*shape \(5, 6\).*\(5, 9\)"):
        tp.Checkpointer(tmp_path).restore(other)
    for name, value in before.items():
        np.testing.assert_array_equal(everything(other)[name], value, err_msg=name)


def pipelines():
    x, y = SPEC.batch(16, 0)
    base = tf.data.Dataset.from_tensor_slices((x, y))
    yield (
        "py_function",
        base.map(
            lambda a, b: (tf.ensure_shape(tf.py_function(lambda t: t, [a], tf.float32), [5]), b)
        ).batch(4),
        "outside TensorFlow",
    )
    yield (
        "random-in-map",
        base.map(lambda a, b: (a + tf.random.uniform([5]), b)).batch(4),
        ("outside TensorFlow"),
    )
    yield "unseeded-shuffle", base.shuffle(16).batch(4), "without a seed"
    four = tf.data.experimental.assert_cardinality(4)
    sampled = tf.data.Dataset.sample_from_datasets([base, base.map(lambda a, b: (-a, b))])
    yield "unseeded-sample", sampled.take(16).batch(4).apply(four), "unseeded random dataset"
    noisy = tf.data.Dataset.zip(base, tf.data.Dataset.random()).map(
        lambda ab, r: (ab[0] + tf.cast(r % 2, tf.float32), ab[1])
    )
    yield "unseeded-random", noisy.batch(4), "unseeded random dataset"


@pytest.mark.parametrize(
    ("data", "match"), [p[1:] for p in pipelines()], ids=[p[0] for p in pipelines()]
)
def test_a_pipeline_that_cannot_be_replayed_is_refused_before_training(tmp_path, data, match):
    state = make_state()
    with pytest.raises(tp.CheckpointError, match=match):
        tp.fit_loop(
            state,
            data,
            tp.make_train_step(SCCE),
            epochs=2,
            checkpoint=tp.Checkpointer(tmp_path, save_every_steps=2),
            verbose=0,
        )
    assert int(state.step) == 0
    assert tp.Checkpointer(tmp_path).checkpoints() == []


def test_checkpointed_fit_loop_equals_plain_fit_loop_and_refuses_a_second_writer(tmp_path):
    def data():  # a fresh dataset each: iterating one advances its reshuffle seed
        x, y = SPEC.batch(30, 0)
        tf.random.set_seed(0)  # the global seed is part of the shuffle's (make_state sets it)
        return tf.data.Dataset.from_tensor_slices((x, y)).shuffle(30, seed=3).batch(8)

    def run(state, callbacks=()):
        return tp.fit_loop(
            state,
            data(),
            tp.make_train_step(SCCE),
            epochs=3,
            checkpoint=tp.Checkpointer(tmp_path, save_every_steps=3),
            callbacks=callbacks,
            verbose=0,
        )

    class SecondWriter(keras.callbacks.Callback):  # another run on the same directory
        refused = None

        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                other = make_state(seed=1)
                with pytest.raises(tp.CheckpointError) as refusal:
                    run(other)
                self.refused = (str(refusal.value), int(other.step))

    plain, saved, writer = make_state(), make_state(), SecondWriter()
    _, h_plain = tp.fit_loop(plain, data(), tp.make_train_step(SCCE), epochs=3, verbose=0)
    _, h_saved = run(saved, [writer])
    assert h_plain == h_saved
    for a, b in zip(plain.model.variables, saved.model.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    message, steps = writer.refused
    assert f"Another run is training in {tmp_path} (.tfpure.lock is held by process" in message
    assert steps == 0 and "Nothing was changed" in message
    with pytest.raises(TypeError, match=r"keras\.callbacks\.Callback"):
        run(make_state(seed=1), ["not a callback"])  # refused after the lock was taken
    _, h_again = run(make_state(seed=1))  # the lock is released when a run ends or fails
    assert h_again == h_saved  # restored, finished: nothing trained


def test_an_early_stopped_run_stays_stopped_when_run_again(tmp_path):
    class StopAfterTwo(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.stop_training = epoch == 1

    class Count(keras.callbacks.Callback):
        batches = 0

        def on_train_batch_end(self, batch, logs=None):
            Count.batches += 1

    x, y = SPEC.batch(24, 0)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)

    def run(state, callbacks):
        return tp.fit_loop(
            state,
            data,
            tp.make_train_step(SCCE),
            epochs=5,
            checkpoint=tp.Checkpointer(tmp_path),
            callbacks=callbacks,
            verbose=0,
        )

    state, history = run(make_state(), [StopAfterTwo()])
    assert int(state.step) == 6 and len(history["loss"]) == 2
    again, history_again = run(make_state(seed=1), [Count()])
    assert int(again.step) == 6 and Count.batches == 0 and history_again == history
    ended = tp.Checkpointer(tmp_path)
    ended.restore(make_state(seed=2))
    assert ended.ended.numpy().decode().startswith("stopped early after 6 steps (epoch 2)")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_to_keep": 0}, "max_to_keep"),
        ({"save_every_steps": 0}, "save_every_steps"),
        ({"save_every_epochs": 1.5}, "save_every_epochs"),
    ],
)
def test_checkpointer_arguments_are_checked(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tp.Checkpointer(tmp_path, **kwargs)


def test_fit_loop_checkpointing_needs_a_dataset_of_known_length(tmp_path):
    ckpt = tp.Checkpointer(tmp_path)
    state, step = make_state(), tp.make_train_step(SCCE)
    with pytest.raises(TypeError, match=r"tf\.data\.Dataset"):
        tp.fit_loop(state, [SPEC.batch(4, 0)], step, checkpoint=ckpt, verbose=0)
    unknown = tf.data.Dataset.from_tensor_slices(SPEC.batch(8, 0)).filter(lambda a, b: True)
    with pytest.raises(ValueError, match="cardinality"):
        tp.fit_loop(state, unknown.batch(4), step, checkpoint=ckpt, verbose=0)
    with pytest.raises(TypeError, match="Checkpointer"):
        tp.fit_loop(state, unknown.batch(4), step, checkpoint="dir", verbose=0)


def test_a_directory_that_cannot_be_written_is_refused_at_the_start(tmp_path):
    """Found before anything is restored or trained, not at the first save. (Root ignores
    permission bits, so the directory is made unwritable by placing it under a file.)"""
    (tmp_path / "file").write_text("")
    state, step = make_state(), tp.make_train_step(SCCE)
    before = tpt.snapshot(state.model.variables)
    data = tf.data.Dataset.from_tensor_slices(SPEC.batch(8, 0)).batch(4)
    ckpt = tp.Checkpointer(tmp_path / "file" / "ckpt")
    with pytest.raises(tp.CheckpointError, match=r"Cannot write the checkpoint directory .*ckpt"):
        tp.fit_loop(state, data, step, checkpoint=ckpt, verbose=0)
    assert int(state.step) == 0
    for name, value in tpt.snapshot(state.model.variables).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)


@pytest.mark.parametrize("updates", [0, 2])
def test_checkpoint_numbers_are_distinct_and_increase_whatever_the_body(tmp_path, updates):
    """Numbered by the loop's steps: a body that leaves `state.step` at 0 (it applies
    through `state.optimizer`), one that steps its state twice a batch, and a skipped
    batch still give each save its own number, the loop's step."""

    def body(state, batch):
        x, y = batch
        for _ in range(max(updates, 1)):
            with tf.GradientTape() as tape:
                loss = SCCE(y, state.model(x, training=True))
            grads = tape.gradient(loss, state.model.trainable_variables)
            if updates:
                state = state.apply_gradients(grads)
            else:
                variables = state.model.trainable_variables
                state.optimizer.apply_gradients(zip(grads, variables, strict=True))
        return state, {"loss": loss}

    x, y = SPEC.batch(36, 0)
    x[13] = np.nan  # the fourth batch is skipped
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)  # 9 batches
    ckpt = tp.Checkpointer(tmp_path, max_to_keep=20, save_every_steps=1, save_every_epochs=None)
    state = make_state()
    tp.fit_loop(state, data, tp.make_step(body, nonfinite="skip"), epochs=1, checkpoint=ckpt,
                verbose=0)  # fmt: skip
    assert int(state.step) == 8 * updates and int(state.skipped) == 1
    assert ckpt.checkpoints() == [str(tmp_path / f"ckpt-{n}") for n in range(9, 0, -1)]
    # Saved again by hand (numbered by state.step unless taken): never the same file.
    assert ckpt.save(state) == str(tmp_path / f"ckpt-{max(10, 8 * updates)}")
    assert len(set(ckpt.checkpoints())) == 10


def test_another_optimizer_class_is_refused_and_another_learning_rate_wins_with_a_warning(
    tmp_path,
):
    def state_with(optimizer, seed=1):
        state = tp.TrainState.create(
            model=SPEC.build(seed),
            optimizer=optimizer,
            metrics={"accuracy": keras.metrics.SparseCategoricalAccuracy()},
        )
        return train_some(state)  # the optimizer built

    ckpt = tp.Checkpointer(tmp_path)
    state = make_state()  # Adam(0.01)
    assert ckpt.restore(state) is None  # as fit_loop starts: the run's settings are taken
    train_some(state).optimizer.learning_rate.assign(0.005)  # as a callback would
    ckpt.save(state)
    saved = everything(state)
    for other in (keras.optimizers.AdamW(0.01), keras.optimizers.Adamax(0.01)):
        refused = state_with(other)
        before = everything(refused)
        name = type(other).__name__
        with pytest.raises(tp.CheckpointError, match=rf"optimizer is Adam, the state's {name} "):
            tp.Checkpointer(tmp_path).restore(refused)
        for key, value in before.items():
            np.testing.assert_array_equal(everything(refused)[key], value, err_msg=key)
    # The run's settings: its own learning rate (0.005, set while it trained) goes on.
    same = state_with(keras.optimizers.Adam(0.01))
    tp.Checkpointer(tmp_path).restore(same)  # no warning (warnings fail the suite)
    assert float(same.optimizer.learning_rate) == np.float32(0.005)
    # Another learning rate wins, with a warning naming both; everything else is restored.
    lowered = state_with(keras.optimizers.Adam(1e-5))
    with pytest.warns(RuntimeWarning, match=r"learning_rate: 0\.00999\d* -> 9\.99\d*e-06"):
        tp.Checkpointer(tmp_path).restore(lowered)
    assert float(lowered.optimizer.learning_rate) == np.float32(1e-5)
    restored = everything(lowered)
    assert len(restored) == len(saved)
    for (key, value), mine in zip(saved.items(), restored.values(), strict=True):
        if "learning_rate" not in key:
            np.testing.assert_array_equal(mine, value, err_msg=key)


@pytest.mark.parametrize("noise", ["tf.random", "keras.random", "seeded"])
def test_a_checkpointed_body_drawing_unsaved_randomness_is_warned_about_before_training(
    tmp_path, noise
):
    """Noise from `tf.random.normal` or an unseeded `keras.random` op cannot be replayed
    by a resume; noise from the state's seed generator (saved) can: no warning."""
    draw = {
        "tf.random": lambda state, shape: tf.random.normal(shape),
        "keras.random": lambda state, shape: keras.random.normal(shape),
        "seeded": lambda state, shape: keras.random.normal(shape, seed=state.rng),
    }[noise]

    def body(state, batch):
        x, y = batch
        x = x + 0.1 * draw(state, tf.shape(x))
        with tf.GradientTape() as tape:
            loss = SCCE(y, state.model(x, training=True))
        return state.apply_gradients(tape.gradient(loss, state.model.trainable_variables)), {
            "loss": loss
        }

    state = make_state()
    before = everything(state)
    data = tf.data.Dataset.from_tensor_slices(SPEC.batch(8, 0)).batch(4)
    run = functools.partial(tp.fit_loop, state, data, tp.make_step(body), epochs=1, verbose=0)
    if noise == "seeded":
        run(checkpoint=tp.Checkpointer(tmp_path))  # warnings fail the suite
        return
    source = r"random numbers from .*(RandomStandardNormal|seed_generator)"
    with pytest.warns(RuntimeWarning, match=source), pytest.raises(KeyboardInterrupt):
        run(checkpoint=tp.Checkpointer(tmp_path), callbacks=[Stop()])  # stops at batch 0
    assert everything(state).keys() == before.keys()
    for name, value in before.items():
        np.testing.assert_array_equal(everything(state)[name], value, err_msg=name)


class Stop(keras.callbacks.Callback):
    def on_train_batch_begin(self, batch, logs=None):
        raise KeyboardInterrupt
