"""XLA with several steps per call: a call's batches run in one XLA loop.

Fed by the data in groups of k batches (`fit_loop` and `fold` when every call
is whole), or stacked from k batches pulled in the graph (calls cut short by
an action, checkpointed runs, `run_on_iterator`); a group of unlike batches (a
ragged last batch) runs one step at a time.
"""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpure as tp
from tfpure.arrays import array_groups, from_arrays
from tfpure.graph import group_batches
from tfpure.state import owned_variables
from tfpure.testing.strategies import ModelSpec

from reference import documented_shuffle, preempted_after
from shared import reused

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
SPEC = ModelSpec((5,), (("dense", 6), ("dropout", 50), ("batchnorm", 0)), num_classes=3, l2=0.01)


def make_state(seed=0):
    return tp.TrainState.create(
        model=SPEC.build(seed),
        optimizer=keras.optimizers.Adam(0.01),
        metrics={"accuracy": keras.metrics.SparseCategoricalAccuracy()},
    )


def data(n=45, batch=8, x=None):
    x_, y = SPEC.batch(n, 0)
    return tf.data.Dataset.from_tensor_slices((x_ if x is None else x, y)).batch(batch)


def xla_step(**kwargs):
    return tp.make_train_step(SCCE, jit_compile=True, steps_per_call=4, **kwargs)


def traces(step, state, name):
    return getattr(step.engine(state), name).experimental_get_tracing_count()


def xla_single():
    """A state and an XLA step of one step a call, shared by the tests (`reused`)."""
    return reused("xla-single", lambda: (make_state(), tp.make_train_step(SCCE, jit_compile=True)))


@functools.cache
def xla_run(**schedule):
    """`fit_loop` of a fresh state and XLA step at 4 steps a call over `data()`: (history,
    every variable's value, how often `on_groups` was traced, the steps run). Run once
    per process: tests compare runs to it."""
    state, step = make_state(), xla_step()
    _, history = tp.fit_loop(state, data(), step, verbose=0, **schedule)
    values = [v.numpy() for v in owned_variables(state)]
    return history, values, traces(step, state, "on_groups"), int(state.step)


def test_groups_from_the_data_equal_batches_stacked_in_the_graph_bit_for_bit():
    """45 examples in batches of 8: 6 batches, the last of 5. Grouped by the data
    (the epoch's calls are whole): a group of 4 alike, then [8, 5] one by one. Stacked
    in the graph (an action every 4 steps cuts the calls): a call of 4 stacked, then
    the epoch's last 2, the next epoch's first 2 steps one by one, then 4 stacked. Both run the same
    XLA loop on the stacked batches, so the same bits."""
    history_g, grouped, grouped_traces, grouped_steps = xla_run(epochs=2)
    pulled, step_p = make_state(), xla_step()
    seen = []
    _, history_p = tp.fit_loop(
        pulled,
        data(),
        step_p,
        epochs=2,
        verbose=0,
        actions=[tp.every(4, lambda state, step, logs: seen.append(step))],
    )
    assert seen == [4, 8, 12]
    assert history_g == history_p
    weights = pulled.model.variables  # (the first of the values `xla_run` returns)
    for a, b in zip(grouped[: len(weights)], weights, strict=True):
        np.testing.assert_array_equal(a, b.numpy(), err_msg=b.path)
    assert grouped_steps == int(pulled.step) == 12
    # Each run took its path: data groups once traced, or none.
    assert grouped_traces == 1
    assert traces(step_p, pulled, "on_groups") == 0


@pytest.mark.parametrize("n, batch", [(45, 8), (3, 8)])
def test_xla_groups_equal_single_xla_steps(n, batch):
    """A short last group with a ragged last batch; one batch in all."""
    fused, step = reused("xla-4", lambda: (make_state(), xla_step()))
    single, single_step = xla_single()
    _, history_f = tp.fit_loop(fused, data(n, batch), step, epochs=1, verbose=0)
    _, history_s = tp.fit_loop(single, data(n, batch), single_step, epochs=1, verbose=0)
    for name in history_s:
        np.testing.assert_allclose(history_f[name], history_s[name], rtol=1e-6, err_msg=name)
    for a, b in zip(fused.model.variables, single.model.variables, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    assert int(fused.step) == int(single.step)


def test_a_nonfinite_batch_inside_an_xla_group_stops_at_that_step_and_changes_nothing():
    x, _ = SPEC.batch(64, 0)
    x[21] = np.nan  # batch 2 (0-based) of 8-example batches: inside the first group of 4
    state = make_state()
    with pytest.raises(tp.NonFiniteError, match=r"at step 2 \(0-based\)"):
        tp.fold(xla_step(), state, data(64, 8, x))
    assert int(state.step) == 2
    reference, single_step = xla_single()
    tp.fold(single_step, reference, data(64, 8, x).take(2))
    for a, b in zip(state.model.variables, reference.model.variables, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7, err_msg=a.path)
    for a, b in zip(state.optimizer.variables, reference.optimizer.variables, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7, err_msg=a.path)


def test_a_skipped_batch_inside_an_xla_group_is_put_back_and_counted():
    """Skipping batch 2 equals training on the other seven batches (Dropout's seed put
    back too), except for the step counter."""
    x, y = SPEC.batch(64, 0)
    x[21] = np.nan
    skipping, logs = tp.fold(xla_step(nonfinite="skip"), make_state(), data(64, 8, x))
    assert int(skipping.step) == 8 and int(logs["skipped"]) == 1
    keep = np.r_[0:16, 24:64]
    clean = tf.data.Dataset.from_tensor_slices((x[keep], y[keep])).batch(8)
    reference, single_step = xla_single()
    tp.fold(single_step, reference, clean)
    for a, b in zip(skipping.model.variables, reference.model.variables, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)


def assert_same_groups(groups, reference):
    """The two datasets of groups (ragged leaves) yield the same elements, bit for bit."""
    for mine, theirs in zip(groups, reference, strict=True):
        for a, b in zip(tf.nest.flatten(mine), tf.nest.flatten(theirs), strict=True):
            np.testing.assert_array_equal(a.to_tensor(), b.to_tensor())


def test_group_batches_stacks_alike_batches_and_keeps_a_ragged_last_one():
    groups = list(group_batches(data(45, 8), 4))
    x, y = groups[0]
    assert [g[0].row_lengths().numpy().tolist() for g in groups] == [[8, 8, 8, 8], [8, 5]]
    assert x.flat_values.shape == (32, 5) and y.flat_values.shape == (32,)
    fixed = list(group_batches(data(48, 8).unbatch().batch(8, drop_remainder=True), 4))
    assert fixed[0][0].shape == (4, 8, 5)  # static batch sizes: dense


def test_groups_of_arrays_are_views_of_the_arrays_equal_to_their_batches_grouped():
    """In order and shuffled (two passes: reshuffled), a dict of arrays: `array_groups`
    yields what ``ragged_batch(4)`` of the same batches yields, spec and bits."""
    x, y = SPEC.batch(45, 0)
    for shuffle in (False, 3):
        sliced, stacked = (from_arrays(({"x": x}, y), 8, shuffle=shuffle) for _ in range(2))
        groups, reference = array_groups(sliced, 4), stacked.ragged_batch(4)
        assert groups.element_spec == reference.element_spec
        assert int(groups.cardinality()) == 2
        for _ in range(2):
            assert_same_groups(groups, reference)
    assert array_groups(sliced.take(6), 4) is None  # derived data: grouped as any dataset


def test_the_tutorials_pipeline_is_grouped_as_views_of_its_arrays_bit_for_bit():
    """``from_tensor_slices(arrays).batch(n)``, maybe prefetched, maybe repeated (as
    arrays given with `batch_size=`): `group_batches` slices the arrays the pipeline holds
    (`array_groups`), yielding what ``ragged_batch(k)`` yields, spec and bits, pass after
    pass; other pipelines are stacked as before."""
    x, y = SPEC.batch(45, 0)
    pipelines = [
        lambda: tf.data.Dataset.from_tensor_slices((x, y)).batch(8),  # a ragged last batch
        lambda: tf.data.Dataset.from_tensor_slices({"x": x, "y": y}).batch(9).prefetch(2),
    ]
    for make in pipelines:
        data, reference = make(), make().ragged_batch(4)
        groups = group_batches(data, 4)
        assert array_groups(data, 4) is groups  # (made once a dataset and k)
        assert groups.element_spec == reference.element_spec
        for _ in range(2):
            assert_same_groups(groups, reference)
    # Repeated endlessly (a step budget's data): where an epoch is whole groups of k.
    data = pipelines[0]().repeat()
    assert array_groups(data, 4) is None  # 6 batches an epoch: groups would span epochs
    groups, reference = array_groups(data, 3), pipelines[0]().repeat().ragged_batch(3)
    assert groups.element_spec == reference.element_spec
    assert_same_groups(groups.take(5), reference.take(5))
    shuffled = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(45, seed=1).batch(8)
    assert array_groups(shuffled, 4) is None
    # Arrays given with `batch_size=`, shuffled each epoch, repeated for a budget: the
    # epochs' groups repeated, each epoch drawing its order anew, as their batches do.
    sliced, stacked = (from_arrays((x, y), 5, shuffle=3).repeat() for _ in range(2))
    groups, reference = array_groups(sliced, 3), stacked.ragged_batch(3)  # 9 batches
    assert_same_groups(groups.take(7), reference.take(7))


def test_an_xla_run_on_shuffled_arrays_is_fed_their_slices_bit_for_bit(monkeypatch):
    """fit_loop over arrays, XLA at 4 steps a call: the groups are the arrays' slices (no
    ``ragged_batch``), and the run equals one over the documented order's pipeline."""
    x, y = SPEC.batch(45, 0)
    reference, step_r = reused("xla-4", lambda: (make_state(), xla_step()))
    keras.utils.set_random_seed(0)  # (the order's draws depend on it, as the arrays' do)
    ordered = documented_shuffle((x, y), 3).batch(8)
    _, history_r = tp.fit_loop(reference, ordered, step_r, epochs=2, verbose=0)
    stacked = []
    ragged_batch = tf.data.Dataset.ragged_batch
    monkeypatch.setattr(
        tf.data.Dataset, "ragged_batch", lambda *a, **k: stacked.append(1) or ragged_batch(*a, **k)
    )
    sliced, step = make_state(), xla_step()
    _, history = tp.fit_loop(sliced, (x, y), step, batch_size=8, shuffle=3, epochs=2, verbose=0)
    assert stacked == [] and traces(step, sliced, "on_groups") == 1
    assert history == history_r
    for a, b in zip(owned_variables(sliced), owned_variables(reference), strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)


def two_models(seed=0):
    keras.utils.set_random_seed(seed)
    a = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, "tanh"), keras.layers.Dense(1)])
    b = keras.Sequential([keras.Input((5,)), keras.layers.Dropout(0.5), keras.layers.Dense(1)])
    return {
        "a": tp.TrainState.create(model=a, optimizer=keras.optimizers.Adam(0.01), seed=seed),
        "b": tp.TrainState.create(model=b, optimizer=keras.optimizers.Adam(0.01), seed=seed + 1),
    }


def two_model_body(states, batch):
    """`b` learns `a`'s prediction plus noise from `a`'s seed generator."""
    a, b = states["a"], states["b"]
    x, y = batch
    y = tf.cast(y[:, None], tf.float32)
    with tf.GradientTape() as tape:
        a_loss = tf.reduce_mean((a.model(x, training=True) - y) ** 2)
    a = a.apply_gradients(tape.gradient(a_loss, a.model.trainable_variables))
    target = a.model(x) + keras.random.normal((tf.shape(x)[0], 1), seed=a.rng)
    with tf.GradientTape() as tape:
        b_loss = tf.reduce_mean((b.model(x, training=True) - target) ** 2)
    b = b.apply_gradients(tape.gradient(b_loss, b.model.trainable_variables))
    return {"a": a, "b": b}, {"a_loss": a_loss, "b_loss": b_loss}


def test_a_user_written_body_in_xla_groups_equals_single_xla_steps_and_skips_alike():
    """Two states in one `make_step` body; a NaN batch in the first group is skipped
    (both states put back, the seed generators too) as by single XLA steps."""
    x, _ = SPEC.batch(64, 0)
    x[21] = np.nan
    fused, single = two_models(), two_models()
    fused, logs_f = tp.fold(
        tp.make_step(two_model_body, jit_compile=True, steps_per_call=4, nonfinite="skip"),
        fused,
        data(64, 8, x),
    )
    single, logs_s = tp.fold(
        tp.make_step(two_model_body, jit_compile=True, nonfinite="skip"), single, data(64, 8, x)
    )
    assert float(logs_f["skipped"]) == float(logs_s["skipped"]) == 1
    for name in logs_s:
        np.testing.assert_allclose(float(logs_f[name]), float(logs_s[name]), rtol=1e-6)
    for key in ("a", "b"):
        # (a body's state counts the updates it applied: the skipped batch is undone)
        assert int(fused[key].step) == int(single[key].step) == 7
        np.testing.assert_array_equal(fused[key].rng.state.numpy(), single[key].rng.state.numpy())
        for u, v in zip(fused[key].model.variables, single[key].model.variables, strict=True):
            np.testing.assert_allclose(u.numpy(), v.numpy(), rtol=1e-5, atol=1e-6, err_msg=u.path)


@pytest.mark.parametrize("eval_every, grouped", [(8, True), (6, False)])
def test_a_step_budget_is_grouped_only_when_every_window_is_whole_calls(eval_every, grouped):
    """Windows of 8 steps are 2 whole calls of 4: the stream is grouped. Windows of 6 end
    in the middle of a call: the batches are pulled instead. Both run the budget exactly."""
    history, _, on_groups, steps = xla_run(steps=16, eval_every=eval_every)
    assert len(history["loss"]) == -(-16 // eval_every)  # windows of 8, 8 or 6, 6, 4
    assert steps == 16 and on_groups == int(grouped)


@pytest.mark.parametrize("run", ["epochs", "budget"])
def test_a_checkpointed_run_is_fed_groups_and_resumes_on_them_bit_for_bit(
    tmp_path, monkeypatch, run
):
    """A Checkpointer leaves the grouped feed on. Epochs: preempted after the first call (4
    steps into an epoch of 6 batches), resumed by replaying one group. Budget: 8 steps, then
    extended to 16 by replaying two groups of the repeated data. Both runs of each take the
    grouped path and end as the uninterrupted run, bit for bit."""
    kwargs = {"epochs": 2} if run == "epochs" else {"steps": 16, "eval_every": 8}
    history_r, reference, *_ = xla_run(**kwargs)
    first, step = make_state(), xla_step()
    if run == "epochs":
        count = preempted_after(1, monkeypatch)  # a SIGTERM as the run sees it
        with pytest.raises(tp.Preempted):
            tp.fit_loop(
                first, data(), step, verbose=0, callbacks=[count],
                checkpoint=tp.Checkpointer(tmp_path), **kwargs,
            )  # fmt: skip
        monkeypatch.undo()
    else:
        tp.fit_loop(first, data(), step, steps=8, eval_every=8, verbose=0,
                    checkpoint=tp.Checkpointer(tmp_path))  # fmt: skip
    assert int(first.step) == 4 * (1 + (run == "budget"))
    assert traces(step, first, "on_groups") == 1
    resumed, step = make_state(), xla_step()
    _, history = tp.fit_loop(
        resumed, data(), step, verbose=0, checkpoint=tp.Checkpointer(tmp_path), **kwargs
    )
    assert traces(step, resumed, "on_groups") == 1
    assert history == history_r
    for a, b in zip(owned_variables(resumed), reference, strict=True):
        np.testing.assert_array_equal(a.numpy(), b, err_msg=a.name)
