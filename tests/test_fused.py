"""steps_per_call (several steps per graph call) and XLA: the same results, fewer calls."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import tfpure as tp
from tfpure import testing as tpt
from tfpure.state import owned_variables
from tfpure.testing import strategies as tps
from tfpure.testing.strategies import ModelSpec

from reference import twin
from shared import reused

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
SPEC = ModelSpec((5,), (("dense", 6), ("dropout", 50), ("batchnorm", 0)), num_classes=3, l2=0.01)


def dataset(spec, n, batch, seed=0):
    return tf.data.Dataset.from_tensor_slices(spec.batch(n, seed)).batch(batch)


def state_maker(spec, seed):
    def make():
        return tp.TrainState.create(
            model=spec.build(seed),
            optimizer=keras.optimizers.Adam(0.01),
            metrics={"accuracy": keras.metrics.SparseCategoricalAccuracy()},
        )

    return make


@settings(max_examples=3)  # each example traces two steps
@given(
    spec=tps.model_specs(),
    seed=tps.seeds(),
    examples=st.integers(1, 40),
    batch=st.integers(1, 8),
    k=st.integers(2, 6),
)
def test_fused_steps_equal_single_steps_bit_for_bit(spec, seed, examples, batch, k):
    """Any k, any dataset size (remainders, a ragged last batch): same variables, same history."""
    tpt.assert_fused_matches_sequential(
        state_maker(spec, seed),
        lambda n: tp.make_train_step(SCCE, steps_per_call=n),
        dataset(spec, examples, batch, seed),
        steps_per_call=k,
    )


def hard_swish_cnn():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.Conv2D(8, 3),
            keras.layers.Activation("hard_swish"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ]
    )


def test_fused_conv_steps_equal_single_steps_and_keras_steps_per_execution_bit_for_bit():
    """A conv net whose graph the optimiser rewrites (a fused Conv2D): the step body is a
    function of its own, as Keras' `one_step_on_data`, so it compiles alike in a loop and
    alone: k=8 and k=1 end on the same bits (as Keras' steps_per_execution=8 and 1 do),
    and where Keras fit ends (another graph: within float rounding)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 16, 16, 3)).astype("float32")
    y = rng.integers(0, 10, 256).astype("int32")
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    ends = []
    for k in (1, 8):
        state = tp.TrainState.create(model=hard_swish_cnn(), optimizer=keras.optimizers.Adam())
        step = tp.make_train_step(SCCE, steps_per_call=k)
        state, _ = tp.fit_loop(state, data, step, verbose=0)
        ends.append(state.model.get_weights())
    # The fused loop's condition is whether a batch came: its body calls the step itself,
    # in no branch (which would pass every variable through a switch at every step).
    spec = tf.data.IteratorSpec(data.element_spec), tf.TensorSpec([], tf.int32)
    graph = step.engine(state).on_iterator.get_concrete_function(*spec).graph
    library = {f.signature.name: f for f in graph.as_graph_def().library.function}
    (loop,) = [op for op in graph.get_operations() if op.type in ("While", "StatelessWhile")]
    body = library[loop.get_attr("body").name].node_def
    calls = [n.attr["f"].func.name for n in body if n.op.endswith("PartitionedCall")]
    assert any("_one_" in name for name in calls), calls
    keras_model = hard_swish_cnn()
    keras_model.compile(optimizer=keras.optimizers.Adam(), loss=SCCE, steps_per_execution=8)
    keras_model.fit(data, epochs=1, verbose=0, shuffle=False)
    ends.append(keras_model.get_weights())
    for fused, keras_weights, single in zip(ends[1], ends[2], ends[0], strict=True):
        np.testing.assert_array_equal(fused, single)
        np.testing.assert_allclose(keras_weights, single, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("k", [2, 3, 16])
def test_fused_eval_equals_plain_eval(k):
    state = state_maker(SPEC, 0)()
    data = dataset(SPEC, 45, 8)
    plain = tp.evaluate(state, data, tp.make_eval_step(SCCE))
    fused_step = tp.make_eval_step(SCCE, steps_per_call=k)
    assert tp.evaluate(state, data, fused_step) == plain
    assert fused_step.experimental_get_tracing_count() == 1


class BatchEnds(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.ends = []

    def on_train_batch_end(self, batch, logs=None):
        self.ends.append(batch)


def test_batch_hooks_fire_once_per_call_like_keras_steps_per_execution():
    data = dataset(SPEC, 50, 8)  # 7 batches, the last one ragged
    model = SPEC.build(0)
    reference = twin(model)
    reference.compile(optimizer=keras.optimizers.Adam(0.01), loss=SCCE, steps_per_execution=3)
    keras_ends, ours = BatchEnds(), BatchEnds()
    reference.fit(data, epochs=2, callbacks=[keras_ends], verbose=0, shuffle=False)
    tp.fit_loop(
        state_maker(SPEC, 0)(),
        data,
        tp.make_train_step(SCCE, steps_per_call=3),
        epochs=2,
        callbacks=[ours],
        verbose=0,
    )
    assert ours.ends == [2, 5, 6] * 2
    # Keras reports begin + 3 - 1 = 8 for its last, one-step call; tfpure the true index 6.
    assert keras_ends.ends == [2, 5, 8] * 2


def test_steps_per_epoch_is_exact_when_not_a_multiple_of_steps_per_call():
    state = state_maker(SPEC, 0)()
    counted = BatchEnds()
    tp.fit_loop(
        state,
        dataset(SPEC, 64, 8).repeat(),
        tp.make_train_step(SCCE, steps_per_call=3),
        epochs=2,
        steps_per_epoch=5,
        callbacks=[counted],
        verbose=0,
    )
    assert int(state.step) == 10 and counted.ends == [2, 4, 2, 4]


def test_run_on_iterator_honours_max_steps():
    state = state_maker(SPEC, 0)()
    step = tp.make_train_step(SCCE, steps_per_call=4)
    iterator = iter(dataset(SPEC, 80, 8))  # 10 batches
    ran = [int(step.run_on_iterator(state, iterator, max_steps=m)[2]) for m in (3, 4, 4, 4)]
    assert ran == [3, 4, 3, 0] and int(state.step) == 10
    assert step.experimental_get_tracing_count() == 1


def test_a_runner_s_calls_of_any_length_equal_single_steps_bit_for_bit():
    """A loop's calls may be cut short (saves, actions, an epoch of `steps_per_epoch`): a
    runner's call runs the batches it pulled ahead first, then newly pulled ones. With
    skipped NaN batches in a call that starts at the held batches' first (2) and
    one that starts inside them (9), every variable, count and log ends as single steps
    end, bit for bit."""
    x, y = SPEC.batch(88, 0)  # 11 batches of 8
    x[[8 * 2 + 1, 8 * 9 + 1]] = np.nan
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    ends = []
    for k in (4, 1):
        state = state_maker(SPEC, 0)()
        step = tp.make_train_step(SCCE, steps_per_call=k, nonfinite="skip")
        if k == 4:
            run = step.runner(state, iter(data))
            ran = [int(run(n)[1]) for n in (3, 1, 5, 2, 4)]
            assert ran == [3, 1, 5, 2, 0]
            logs = step.results(state)
        else:
            for batch in data:
                state, logs = step(state, batch)
        ends.append(({k: float(v) for k, v in logs.items()}, values(state)))
    (fused_logs, fused), (single_logs, single) = ends
    assert fused_logs == single_logs and fused_logs["skipped"] == 2
    for a, b in zip(fused, single, strict=True):
        np.testing.assert_array_equal(a, b)


def test_xla_with_fused_steps_matches_the_plain_graph():
    spec = ModelSpec((5,), (("dense", 6), ("batchnorm", 0)), num_classes=3, l2=0.01)
    data = dataset(spec, 45, 8)
    plain, xla = state_maker(spec, 3)(), state_maker(spec, 3)()
    _, h_plain = tp.fit_loop(
        plain, data, tp.make_train_step(SCCE), epochs=2, val_data=data, verbose=0
    )
    _, h_xla = tp.fit_loop(
        xla,
        data,
        tp.make_train_step(SCCE, jit_compile=True, steps_per_call=4),
        epochs=2,
        eval_step=tp.make_eval_step(SCCE, jit_compile=True, steps_per_call=4),
        val_data=data,
        verbose=0,
    )
    for name in h_plain:
        np.testing.assert_allclose(h_xla[name], h_plain[name], rtol=1e-5, err_msg=name)
    for a, b in zip(plain.model.variables, xla.model.variables, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)


def values(state, metrics=True):
    """Every variable a step may write (`metrics`: its metrics' too), in a fixed order."""
    held = [state.step, state.skipped, *state.model.variables, *state.optimizer.variables]
    return [v.numpy() for v in held + [v for m in state.metrics.values() for v in m.variables
                                       if metrics]]  # fmt: skip


def run(step, state, data):
    """`fold` of `step`: (the error it raised or None, the state's values, the logs)."""
    try:
        _, logs = tp.fold(step, state, data)
    except (tp.NonFiniteError, tf.errors.InvalidArgumentError) as err:
        return type(err), values(state), None
    return None, values(state), {k: float(v) for k, v in logs.items()}


@pytest.mark.parametrize(
    "nonfinite, bad",
    [
        ("raise", {"nan": [21]}),  # batch 2 (0-based) of 8-example batches
        ("skip", {"nan": [13, 21, 38]}),  # batches 1 and 2 in the first call, 4 in the second
        ("raise", {"label": [21]}),  # a run-time error of the forward pass in batch 2
    ],
)
def test_a_failed_step_inside_a_fused_call_ends_as_single_steps_end_bit_for_bit(nonfinite, bad):
    """A fused call judges its steps at once, and runs them again one by one under the
    whole guard when one is not kept: every variable, count and log ends as with single
    steps. So does a window of one-step calls (`fold` at k=1: the pass's 6 steps judged
    together), a run-time error in its step 2 included (the window put back, steps 0-1 run
    again, the error raised)."""
    x, y = SPEC.batch(48, 0)
    x[bad.get("nan", [])] = np.nan
    y[bad.get("label", [])] = 99
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    results, examples = [], []
    for k, batches in [(4, data), (1, data), (1, list(data))]:  # (a list: step(state, batch))
        state, step = (
            state_maker(SPEC, 0)(),
            tp.make_train_step(SCCE, steps_per_call=k, nonfinite=nonfinite),
        )
        results.append(run(step, state, batches))
        examples.append(step.examples(state))
    window = step.engine(state).window
    assert window.on_next.experimental_get_tracing_count() == 0
    assert window.on_lasting.experimental_get_tracing_count() == 0
    (error, fused, fused_logs), *others = results
    assert error is not None or fused_logs["skipped"] == 3
    assert examples[0] == examples[1] == examples[2]
    for other_error, other, other_logs in others:
        assert error is other_error is (None if nonfinite == "skip" else error)
        assert fused_logs == other_logs
        for a, b in zip(fused, other, strict=True):
            np.testing.assert_array_equal(a, b)
    assert int(fused[0]) == (6 if nonfinite == "skip" else 2)  # state.step


@pytest.mark.parametrize("jit_compile", [False, True])
def test_loss_scale_overflows_inside_a_fused_call_equal_single_steps(jit_compile):
    """Steps a LossScaleOptimizer skips (its scale overflowing the gradients) are not kept:
    a plain fused call runs again one step at a time, an XLA group puts them back by
    selects; either ends as single steps end, the lowered scale and its counter kept
    (the plain graph bit for bit; XLA k=4 loops round otherwise than single XLA steps)."""
    states = []
    for k in (4, 1):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((5,)), keras.layers.Dense(6, "tanh"), keras.layers.Dense(3)]
        )
        state = tp.TrainState.create(
            model=model,
            optimizer=keras.optimizers.LossScaleOptimizer(
                keras.optimizers.Adam(0.01), initial_scale=2.0**127
            ),
        )
        x, y = SPEC.batch(64, 0)
        big = x * 1e3  # first-layer gradients overflow at scales over ~1e36
        data = tf.data.Dataset.from_tensor_slices((big, y)).batch(8)
        tp.fold(tp.make_train_step(SCCE, jit_compile=jit_compile, steps_per_call=k), state, data)
        states.append(state)
    fused, single = states
    scale = fused.optimizer
    assert float(single.optimizer.dynamic_scale) < 2.0**127  # some steps overflowed
    assert float(scale.dynamic_scale) == float(single.optimizer.dynamic_scale)
    assert int(scale.step_counter) == int(single.optimizer.step_counter)
    assert int(scale.iterations) == int(single.optimizer.iterations) == int(single.step) < 8
    assert int(fused.step) == int(single.step)  # the overflowed steps were put back
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if jit_compile else {"rtol": 0, "atol": 0}
    for a, b in zip(
        [*fused.optimizer.variables, *fused.model.variables],
        [*single.optimizer.variables, *single.model.variables],
        strict=True,
    ):
        np.testing.assert_allclose(a.numpy(), b.numpy(), **tolerance, err_msg=a.name)


def test_a_user_written_body_skips_inside_a_fused_call_as_in_single_steps():
    """The log means a fused call moved before its failed step are put back with the rest."""

    def body(state, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = SCCE(y, state.model(x, training=True))
        grads = tape.gradient(loss, state.model.trainable_variables)
        return state.apply_gradients(grads), {"loss": loss}

    x, y = SPEC.batch(48, 0)
    x[[13, 21]] = np.nan
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    results = [
        run(tp.make_step(body, steps_per_call=k, nonfinite="skip"), state_maker(SPEC, 0)(), data)
        for k in (4, 1)
    ]
    (_, fused, fused_logs), (_, single, single_logs) = results
    assert fused_logs == single_logs and fused_logs["skipped"] == 2
    for a, b in zip(fused, single, strict=True):
        np.testing.assert_array_equal(a, b)


def finite_checkpoints(directory):
    """How many checkpoints `directory` holds; fails if one holds a non-finite value."""
    paths = tp.Checkpointer(directory).checkpoints()
    for path in paths:
        reader = tf.train.load_checkpoint(path)
        for name in reader.get_variable_to_shape_map():
            value = np.asarray(reader.get_tensor(name))
            if value.dtype.kind == "f":
                assert np.isfinite(value).all(), f"{path}: {name} is not finite"
    return len(paths)


# 20 batches of 8 in 2 epochs of 10 steps, in calls (or windows) cut by saves every 4
# steps: [0-3] [4-7] [8-9] | [10-11] [12-15] [16-19]. Bad batches: the run's and a call's
# first step (0), a call's middle (5) and last (7) steps, the epoch's last step in its
# short call (9), the next epoch's first step (10).
POSITIONS = [0, 5, 7, 9, 10]


def test_an_error_of_the_data_ends_a_window_with_its_steps_kept():
    """The data failing inside a window of one-step calls (a check in its pipeline, at
    batch 5): the window is put back and its steps before the error run again one at a
    time, so they are kept as single steps keep them (bit for bit), and the data's error
    is raised. A fused call pulls its batches before any step runs: the data failing in
    its pull (batch 5, of the second call of 4) raises before the call writes anything,
    its batch 4 unrun (never judged: it leaves no trace), and the run ends as single
    steps end after the first call."""
    x, y = SPEC.batch(64, 0)
    x[43] = np.nan  # batch 5 (0-based) of 8-example batches
    checked = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    checked = checked.map(lambda x, y: (tf.debugging.check_numerics(x, "bad data"), y))
    for k, single in [(1, 5), (4, 4)]:
        state = state_maker(SPEC, 0)()
        with pytest.raises(tf.errors.InvalidArgumentError, match="bad data"):
            tp.fold(tp.make_train_step(SCCE, steps_per_call=k), state, checked)
        clean, step = state_maker(SPEC, 0)(), tp.make_train_step(SCCE)
        for batch in checked.take(single):
            clean, _ = step(clean, batch)
        assert int(state.step) == single
        for a, b in zip(values(state), values(clean), strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_window_interrupted_between_its_steps_leaves_its_state_judged():
    """A KeyboardInterrupt between a window's steps: the steps it ran are judged before
    the interrupt goes on (a NaN batch among them skipped, as a single step skips it)."""
    from tfpure.compat import flat_caller

    x, y = SPEC.batch(32, 0)
    x[11] = np.nan  # batch 1 (0-based) of 8-example batches
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    ends = []
    for window in (True, False):
        state, step = state_maker(SPEC, 0)(), tp.make_train_step(SCCE, nonfinite="skip")
        if window:
            engine, iterator = step.engine(state), iter(data)
            spec = tf.data.IteratorSpec(data.element_spec), tf.TensorSpec([], tf.int32)
            call = flat_caller(engine.window.on_next.get_concrete_function(*spec), iterator)
            calls = []

            def interrupted(limit, call=call, calls=calls):
                calls.append(call(limit))
                if len(calls) == 3:
                    raise KeyboardInterrupt
                return calls[-1]

            with pytest.raises(KeyboardInterrupt):
                engine.window.run(interrupted, tf.constant(1), 4, data.element_spec)
        else:
            for batch in data.take(2):
                state, _ = step(state, batch)
        ends.append(values(state))
    assert int(ends[0][0]) == 2 and int(ends[0][1]) == 1  # state.step, state.skipped
    for a, b in zip(*ends, strict=True):
        np.testing.assert_array_equal(a, b)


def test_windows_hold_16_to_64_steps_by_their_batches_size_and_end_as_single_steps(
    monkeypatch,
):
    """A window of one-step calls runs up to 64 steps (`tfpure.graph.WINDOW`), fewer
    where that many batches (each the size of its first) would take more than
    `HELD_BYTES`, but at least 16: `fold` over 100 small batches judges windows of 64
    and 36 steps; with no byte to spare, of 16 (six, then 4 at the data's end). NaN
    batches at a window's first step, its 16th and 17th, its middle, its last, the
    data's last: skipped as single steps skip them, bit for bit, either way."""
    from tfpure import graph

    x, y = SPEC.batch(800, 0)
    x[[8 * b + 3 for b in (0, 15, 16, 40, 63, 64, 99)]] = np.nan
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    single = state_maker(SPEC, 0)()
    _, single_logs = tp.fold(tp.make_train_step(SCCE, nonfinite="skip"), single, list(data))
    state, step = state_maker(SPEC, 0)(), tp.make_train_step(SCCE, nonfinite="skip")
    window, owned = step.engine(state).window, owned_variables(state)
    initial = [v.numpy() for v in owned]
    lengths, judged = [], window._run

    def counted(*args):
        ran, logs, ended = judged(*args)
        lengths.append(ran)
        return ran, logs, ended

    monkeypatch.setattr(window, "_run", counted)
    for held_bytes, windows in [(graph.HELD_BYTES, [64, 36]), (0, [16] * 6 + [4])]:
        monkeypatch.setattr(graph, "HELD_BYTES", held_bytes)
        for v, value in zip(owned, initial, strict=True):
            v.assign(value)
        lengths.clear()
        _, logs = tp.fold(step, state, data)
        assert lengths == windows
        assert logs == single_logs and int(logs["skipped"]) == 7
        for a, b in zip(values(state), values(single), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("ran", [True, False])
def test_a_fused_call_interrupted_leaves_the_state_from_before_it(ran):
    """A KeyboardInterrupt in a fused call's graph call, once its steps ran (before they are
    judged) or before it started: the state is the one the call before it left, judged
    (single steps' state after that call's batches, bit for bit). Once they ran, the call
    is put back from its copy; before it started, its copy is not whole (the one there is
    the call before's: putting it back would undo that call)."""
    from tfpure.graph import Runner

    data = dataset(SPEC, 64, 8)
    state, step = state_maker(SPEC, 0)(), tp.make_train_step(SCCE, steps_per_call=4)
    iterator = iter(data)
    runner = Runner(step.engine(state).fused, iterator)
    steps, calls = runner._call_steps, []

    def interrupted(lists, start, n, ahead):  # (a call of no step pulls only)
        calls.extend([n] if int(n) else [])
        if len(calls) == 2 and not ran:
            raise KeyboardInterrupt
        out = steps(lists, start, n, ahead)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return out

    runner._call_steps = interrupted
    assert runner(tf.constant(4))[0] == 4
    with pytest.raises(KeyboardInterrupt):
        runner(tf.constant(4))
    clean, single = state_maker(SPEC, 0)(), tp.make_train_step(SCCE)
    for batch in data.take(4):
        clean, _ = single(clean, batch)
    assert int(state.step) == 4 and len(calls) == 2
    for a, b in zip(values(state), values(clean), strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(list(iterator)) == 0  # the interrupted call's batches were consumed


class BatchEnd(keras.callbacks.Callback):
    """A batch hook: at one step a call, each step is then judged alone (no window)."""

    def on_train_batch_end(self, batch, logs=None):
        del batch, logs


def checkpointed_run(state, step, directory, bad=(), callbacks=()):
    """`fit_loop` over 2 epochs of 10 batches of 8, NaN in the `bad` batches, saving every
    4 steps (the saves cut the calls, or at k=1 the windows: [0-3] [4-7] [8-9] |
    [10-11] [12-15] ...) and at each epoch's end: (history, or the error's text with the
    layer numbers left out; the checkpoints written, all finite)."""
    x, y = SPEC.batch(160, 0)
    x[[8 * b + 3 for b in bad]] = np.nan
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    ckpt = tp.Checkpointer(directory, save_every_steps=4, max_to_keep=20)
    try:
        _, history = tp.fit_loop(state, data, step, epochs=2, steps_per_epoch=10,
                                 checkpoint=ckpt, callbacks=callbacks, verbose=0)  # fmt: skip
    except tp.NonFiniteError as err:
        history = re.sub(r"_\d+/", "/", str(err))  # (layer names numbered per model)
    return history, finite_checkpoints(directory)


def saves_after(steps):
    """How many saves `checkpointed_run` makes in its first `steps` steps."""
    return sum(s % 4 == 0 or s % 10 == 0 for s in range(1, steps + 1))


def test_skipped_steps_at_every_position_of_a_fused_call_end_as_single_steps(tmp_path):
    """A fused call, or a window of one-step calls, is judged once, by the state it
    leaves: wherever its bad steps are (a call's or window's first step 0, middle 5,
    last 7, last 9 at an epoch's end, the next epoch's first 10), the run ends as
    single steps end, bit for bit (variables, counts, history), and no checkpoint holds a
    non-finite value."""
    ends = []
    for name, k, callbacks in [("k4", 4, []), ("window", 1, []), ("k1", 1, [BatchEnd()])]:
        state = state_maker(SPEC, 0)()
        step = tp.make_train_step(SCCE, steps_per_call=k, nonfinite="skip")
        ends.append((*checkpointed_run(state, step, tmp_path / name, POSITIONS, callbacks),
                     state))  # fmt: skip
    (history, saves, fused), *others = ends
    assert history["skipped"] == [4, 1] and saves == saves_after(20)
    for other_history, other_saves, other in others:
        assert other_history == history and other_saves == saves
        for a, b in zip(values(fused), values(other), strict=True):
            np.testing.assert_array_equal(a, b)
    assert int(fused.step) == 20  # skipped steps count


def test_xla_windows_hold_their_start_while_xla_steps_write_and_end_as_single_steps(tmp_path):
    """At one step a call under XLA, a window holds the values from its start while the
    XLA steps update the variables (each update then writes a copy, never over them):
    with bad steps at every position, windows end as XLA steps judged one at a time
    end, bit for bit, and no checkpoint holds a non-finite value."""
    ends = []
    for name, callbacks in [("window", []), ("k1", [BatchEnd()])]:  # one XLA step compiled
        state, step = reused("xla-skip", lambda: (
            state_maker(SPEC, 0)(), tp.make_train_step(SCCE, nonfinite="skip", jit_compile=True)
        ))  # fmt: skip
        ends.append((*checkpointed_run(state, step, tmp_path / name, POSITIONS, callbacks),
                     values(state)))  # fmt: skip
    (history, saves, window), (single_history, single_saves, single) = ends
    assert history["skipped"] == [4, 1] and history == single_history
    assert saves == single_saves == saves_after(20)
    for a, b in zip(window, single, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_raising_step_at_every_position_of_a_fused_call_leaves_the_state_before_it(tmp_path):
    """In "raise" mode the run stops at the bad step, wherever it is in its call or
    window, with every variable as single steps leave it before that step (a clean
    single-step run's values, bit for bit; metrics aside, reset as an epoch begins), and
    every checkpoint written before it finite."""
    clean, seen = state_maker(SPEC, 0)(), {}
    start = values(clean, metrics=False)
    record = tp.every(1, lambda state, n, logs: seen.__setitem__(n, values(state, False)))
    tp.fit_loop(clean, dataset(SPEC, 160, 8), tp.make_train_step(SCCE), epochs=2,
                steps_per_epoch=10, actions=[record], callbacks=[BatchEnd()],
                verbose=0)  # fmt: skip
    for k in (4, 1):  # calls of 4 steps; windows of one-step calls
        state, step = state_maker(SPEC, 0)(), tp.make_train_step(SCCE, steps_per_call=k)
        owned = owned_variables(state)
        initial = [v.numpy() for v in owned]
        for bad in POSITIONS:  # one state and one step for all: traced once
            for v, value in zip(owned, initial, strict=True):
                v.assign(value)
            message, saves = checkpointed_run(state, step, tmp_path / f"k{k}at{bad}", [bad])
            assert f"at step {bad} (0-based)" in message and saves == saves_after(bad)
            for a, b in zip(values(state, False), seen.get(bad, start), strict=True):
                np.testing.assert_array_equal(a, b, err_msg=f"k={k}, bad step {bad}")


def caller(step, state, iterator):
    """``run_on_iterator`` as a function of nothing (the state captured, not an argument)."""

    def call():
        _, logs, n = step.run_on_iterator(state, iterator)
        return n, logs

    return call


def test_run_on_iterator_inside_a_users_graph_replays_a_failed_call_as_eager_calls_do():
    """Called inside a user's `tf.function`, a fused call whose step is skipped is replayed
    in that graph (a `tf.cond`): the same steps, logs and variables as eager calls."""
    spec = ModelSpec((5,), (("dense", 4),), num_classes=3)
    x, y = spec.batch(48, 0)
    x[13] = np.nan  # batch 1 (0-based) of 8-example batches: inside the first call of 4
    ends = []
    for in_graph in (False, True):
        state = state_maker(spec, 0)()
        step = tp.make_train_step(SCCE, steps_per_call=4, nonfinite="skip")
        iterator = iter(tf.data.Dataset.from_tensor_slices((x, y)).batch(8))

        call = caller(step, state, iterator)
        call = tf.function(call, autograph=False) if in_graph else call
        runs = [call() for _ in range(3)]
        ends.append(([(int(n), {k: float(v) for k, v in logs.items()}) for n, logs in runs],
                     values(state)))  # fmt: skip
    (eager, eager_values), (graph, graph_values) = ends
    assert [n for n, _ in eager] == [4, 2, 0] and eager[-1][1]["skipped"] == 1
    assert graph == eager
    for a, b in zip(graph_values, eager_values, strict=True):
        np.testing.assert_array_equal(a, b)
