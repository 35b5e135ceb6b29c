"""make_step: user-written bodies over several states, against a hand-written tf.function loop."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpure as tp
from tfpure import testing as tpt

from reference import twin

BCE = keras.losses.BinaryCrossentropy(from_logits=True)
NOISE = 3


def networks(seed=0):
    keras.utils.set_random_seed(seed)
    g = keras.Sequential(
        [keras.Input((NOISE,)), keras.layers.Dense(8, "tanh"), keras.layers.Dense(2)], name="g"
    )
    d = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(8, "relu"), keras.layers.Dense(1)], name="d"
    )
    return g, d


def states(g, d, seed=0):
    return {
        "g": tp.TrainState.create(model=g, optimizer=keras.optimizers.Adam(0.01), seed=seed),
        "d": tp.TrainState.create(model=d, optimizer=keras.optimizers.Adam(0.01), seed=seed + 1),
    }


def gan_losses(g_model, d_model, real, z):
    real_logits = d_model(real, training=True)
    fake_logits = d_model(g_model(z, training=True), training=True)
    return BCE(tf.ones_like(real_logits), real_logits) + BCE(
        tf.zeros_like(fake_logits), fake_logits
    )


def gan_step(states, batch):
    """The body under test: noise from the generator state's seed generator."""
    g, d = states["g"], states["d"]
    real, poison = batch
    n = tf.shape(real)[0]
    with tf.GradientTape() as tape:
        d_loss = gan_losses(g.model, d.model, real, keras.random.normal((n, NOISE), seed=g.rng))
    d = d.apply_gradients(tape.gradient(d_loss, d.model.trainable_variables))
    with tf.GradientTape() as tape:
        fake = g.model(keras.random.normal((n, NOISE), seed=g.rng), training=True)
        logits = d.model(fake, training=True)
        g_loss = BCE(tf.ones_like(logits), logits) * tf.reduce_mean(poison)
    g = g.apply_gradients(tape.gradient(g_loss, g.model.trainable_variables))
    return {"g": g, "d": d}, {"d_loss": d_loss, "g_loss": g_loss}


def hand_written(g_model, d_model, seed=0):
    """The same body as a plain tf.function with the optimizers called directly."""
    g_opt, d_opt = keras.optimizers.Adam(0.01), keras.optimizers.Adam(0.01)
    g_opt.build(g_model.trainable_variables)
    d_opt.build(d_model.trainable_variables)
    rng = keras.random.SeedGenerator(seed)

    @tf.function
    def step(real, poison):
        n = tf.shape(real)[0]
        with tf.GradientTape() as tape:
            d_loss = gan_losses(g_model, d_model, real, keras.random.normal((n, NOISE), seed=rng))
        grads = tape.gradient(d_loss, d_model.trainable_variables)
        d_opt.apply_gradients(zip(grads, d_model.trainable_variables, strict=True))
        with tf.GradientTape() as tape:
            fake = g_model(keras.random.normal((n, NOISE), seed=rng), training=True)
            logits = d_model(fake, training=True)
            g_loss = BCE(tf.ones_like(logits), logits) * tf.reduce_mean(poison)
        grads = tape.gradient(g_loss, g_model.trainable_variables)
        g_opt.apply_gradients(zip(grads, g_model.trainable_variables, strict=True))
        return d_loss, g_loss

    return step, (g_opt, d_opt)


def data(n=50, batch=16, seed=0, poison_batch=None):
    rng = np.random.default_rng(seed)
    real = rng.normal(2.0, 0.5, size=(n, 2)).astype("float32")
    poison = np.ones((n,), "float32")
    if poison_batch is not None:
        poison[poison_batch * batch] = np.nan
    return tf.data.Dataset.from_tensor_slices((real, poison)).batch(batch)  # 16, 16, 16, 2


def everything(s):
    """Every variable of a state, by position (two states' variable names differ)."""
    values = tpt.snapshot([*s.model.variables, *s.optimizer.variables, s.step, s.rng.state])
    return {f"variable {i}": v for i, v in enumerate(values.values())}


def assert_close(a, b, **tolerance):
    for name, value in a.items():
        np.testing.assert_allclose(b[name], value, err_msg=name, **tolerance)


def test_direct_calls_equal_the_hand_written_loop_and_trace_once():
    g, d = networks()
    ref_g, ref_d = twin(g), twin(d)
    s = states(g, d)
    ref_step, ref_opts = hand_written(ref_g, ref_d)
    step = tp.make_step(gan_step)
    sizes = []
    for batch in data():
        s, logs = step(s, batch)
        ref_step(*batch)
        sizes.append(len(batch[0]))
    for a, b in ((g, ref_g), (d, ref_d)):
        for va, vb in zip(a.variables, b.variables, strict=True):
            np.testing.assert_allclose(
                va.numpy(), vb.numpy(), rtol=1e-6, atol=1e-6, err_msg=va.path
            )
    for opt, ref in zip((s["g"].optimizer, s["d"].optimizer), ref_opts, strict=True):
        for va, vb in zip(opt.variables, ref.variables, strict=True):
            np.testing.assert_allclose(va.numpy(), vb.numpy(), rtol=1e-6, atol=1e-6)
    assert int(s["g"].step) == int(s["d"].step) == 4
    assert sorted(logs) == ["d_loss", "g_loss"]
    assert step.experimental_get_tracing_count() == 1  # batch sizes 16 and 2: one trace


@pytest.mark.parametrize("k", [1, 4])
def test_fit_loop_equals_the_hand_written_loop_with_weighted_epoch_means(k):
    g, d = networks()
    ref_g, ref_d = twin(g), twin(d)
    ref_step, _ = hand_written(ref_g, ref_d)
    expected = {"d_loss": [], "g_loss": []}
    for _ in range(3):
        logs, sizes = [], []
        for batch in data():
            logs.append([float(v) for v in ref_step(*batch)])
            sizes.append(len(batch[0]))
        means = np.average(np.array(logs), axis=0, weights=sizes)
        expected["d_loss"].append(means[0])
        expected["g_loss"].append(means[1])

    step = tp.make_step(gan_step, steps_per_call=k)
    s, history = tp.fit_loop(states(g, d), data(), step, epochs=3, verbose=0)
    assert sorted(history) == ["d_loss", "g_loss"]
    for name, values in expected.items():
        np.testing.assert_allclose(history[name], values, rtol=1e-6, err_msg=name)
    for a, b in ((g, ref_g), (d, ref_d)):
        for va, vb in zip(a.variables, b.variables, strict=True):
            np.testing.assert_allclose(
                va.numpy(), vb.numpy(), rtol=1e-6, atol=1e-6, err_msg=va.path
            )
    assert step.experimental_get_tracing_count() <= 2
    assert int(s["g"].step) == 12


def test_skip_undoes_a_batch_that_poisons_only_the_second_update():
    """The discriminator's update (finite) is rolled back with the generator's (NaN)."""
    g, d = networks()
    clean_g, clean_d = twin(g), twin(d)
    poisoned, clean = states(g, d), states(clean_g, clean_d)
    step, clean_step = tp.make_step(gan_step, nonfinite="skip"), tp.make_step(gan_step)
    batches = list(data(poison_batch=1))
    for i, batch in enumerate(batches):
        poisoned, logs = step(poisoned, batch)
        if i != 1:
            clean, clean_logs = clean_step(clean, batch)
    for name in ("g", "d"):
        got, want = everything(poisoned[name]), everything(clean[name])
        for key, value in want.items():
            np.testing.assert_array_equal(got[key], value, err_msg=f"{name}: {key}")
        assert int(poisoned[name].skipped) == 1
    assert float(logs["skipped"]) == 1
    for name in ("d_loss", "g_loss"):  # the skipped batch is not in the means
        assert float(logs[name]) == pytest.approx(float(clean_logs[name]), rel=1e-6)


def test_raise_names_the_failed_check_and_changes_nothing():
    s = states(*networks())
    step = tp.make_step(gan_step)
    batches = list(data(poison_batch=1))
    s, _ = step(s, batches[0])
    before = {name: everything(s[name]) for name in s}
    failed = (
        r"\[\"gradients of states\['g'\]\", \"log 'g_loss'\", \"variables of states\['g'\]\"\]\. "
        "No variable changed"
    )
    with pytest.raises(tp.NonFiniteError, match=failed):
        step(s, batches[1])
    for name in s:
        after = everything(s[name])
        for key, value in before[name].items():
            np.testing.assert_array_equal(after[key], value, err_msg=f"{name}: {key}")


def test_a_checkpointed_two_state_run_resumes_where_it_stopped(tmp_path):
    """In-process: train 2 epochs, resume in fresh states to 3; equals 3 epochs straight."""
    straight, history = tp.fit_loop(
        states(*networks()), data(), tp.make_step(gan_step), epochs=3, verbose=0
    )
    ckpt = tp.Checkpointer(tmp_path)
    tp.fit_loop(
        states(*networks()), data(), tp.make_step(gan_step), epochs=2, checkpoint=ckpt, verbose=0
    )
    resumed, resumed_history = tp.fit_loop(
        states(*networks()),
        data(),
        tp.make_step(gan_step),
        epochs=3,
        checkpoint=tp.Checkpointer(tmp_path),
        verbose=0,
    )
    assert resumed_history == history
    for name in ("g", "d"):
        want, got = everything(straight[name]), everything(resumed[name])
        for key, value in want.items():
            np.testing.assert_array_equal(got[key], value, err_msg=f"{name}: {key}")


def test_evaluate_with_a_user_written_eval_body():
    s = states(*networks())

    def score(states, batch):
        real, _ = batch
        logits = states["d"].model(real, training=False)
        return states, {"real_prob": tf.reduce_mean(tf.sigmoid(logits))}

    ds = data()
    got = tp.evaluate(s, ds, tp.make_step(score))
    probs = [tf.reduce_mean(tf.sigmoid(s["d"].model(r))).numpy() for r, _ in ds]
    assert got["real_prob"] == pytest.approx(np.average(probs, weights=[16, 16, 16, 2]), rel=1e-6)


def test_bodies_that_break_the_contract_get_clear_errors():
    s = states(*networks())
    batch = next(iter(data()))
    with pytest.raises(TypeError, match="pair"):
        tp.make_step(lambda states, batch: states)(s, batch)
    with pytest.raises(TypeError, match="structure"):
        tp.make_step(lambda states, batch: (states["g"], {}))(s, batch)
    with pytest.raises(ValueError, match="scalars"):
        tp.make_step(lambda states, batch: (states, {"v": batch[0]}))(s, batch)
    with pytest.raises(TypeError, match="callable"):
        tp.make_step("not a function")
    with pytest.raises(ValueError, match="eval_step"):
        tp.fit_loop(s, data(), tp.make_step(gan_step), val_data=data(), verbose=0)
    with pytest.raises(TypeError, match="takes one"):
        tp.make_train_step("mse")(s, batch)
    with pytest.raises(ValueError, match="gradients for the"):
        s["g"].apply_gradients([None])


def test_an_ema_teacher_updated_inside_the_body_is_rolled_back_with_the_rest():
    keras.utils.set_random_seed(0)
    student = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    teacher = twin(student)
    s = {
        "student": tp.TrainState.create(model=student, optimizer=keras.optimizers.SGD(0.1)),
        "teacher": tp.TrainState.create(model=teacher, optimizer=keras.optimizers.SGD()),
    }

    def body(states, batch):
        x, y = batch
        st, te = states["student"], states["teacher"]
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((st.model(x, training=True) - y) ** 2)
        st = st.apply_gradients(tape.gradient(loss, st.model.trainable_variables))
        for t, v in zip(te.model.trainable_variables, st.model.trainable_variables, strict=True):
            t.assign(0.9 * t + 0.1 * v)
        return {"student": st, "teacher": te}, {"loss": loss}

    step = tp.make_step(body, nonfinite="skip")
    x, y = np.ones((4, 2), "float32"), np.zeros((4, 1), "float32")
    s, _ = step(s, (x, y))
    before = [v.numpy() for v in teacher.variables]
    s, logs = step(s, (x, np.full((4, 1), np.inf, "float32")))
    for v, b in zip(teacher.variables, before, strict=True):
        np.testing.assert_array_equal(v.numpy(), b)
    assert int(s["student"].step) == 1 and int(s["teacher"].skipped) == 1
    assert float(logs["skipped"]) == 1


def alternating(use_cond):
    """The generator updated every second step, written with an autograph `if` (the
    state updated in place) or with `tf.cond`."""

    def body(states, batch):
        g, d = states["g"], states["d"]
        real, poison = batch
        n = tf.shape(real)[0]
        z = keras.random.normal((n, NOISE), seed=g.rng)
        with tf.GradientTape(persistent=True) as tape:
            d_loss = gan_losses(g.model, d.model, real, z)
            logits = d.model(g.model(z, training=True), training=True)
            g_loss = BCE(tf.ones_like(logits), logits) * tf.reduce_mean(poison)
        g_grads = tape.gradient(g_loss, g.model.trainable_variables)
        d = d.apply_gradients(tape.gradient(d_loss, d.model.trainable_variables))
        if use_cond:
            tf.cond(d.step % 2 == 0, lambda: g.apply_gradients(g_grads).step, lambda: g.step)
        elif d.step % 2 == 0:
            g.apply_gradients(g_grads)  # in place: a reassigned state cannot leave a branch
        return {"g": g, "d": d}, {"d_loss": d_loss}

    return body


def hand_written_alternating(g_model, d_model):
    g_opt, d_opt = keras.optimizers.Adam(0.01), keras.optimizers.Adam(0.01)
    g_opt.build(g_model.trainable_variables)
    d_opt.build(d_model.trainable_variables)
    rng, steps = keras.random.SeedGenerator(0), tf.Variable(0, dtype=tf.int64)

    @tf.function
    def step(real, poison):
        n = tf.shape(real)[0]
        z = keras.random.normal((n, NOISE), seed=rng)
        with tf.GradientTape(persistent=True) as tape:
            d_loss = gan_losses(g_model, d_model, real, z)
            logits = d_model(g_model(z, training=True), training=True)
            g_loss = BCE(tf.ones_like(logits), logits) * tf.reduce_mean(poison)
        g_grads = tape.gradient(g_loss, g_model.trainable_variables)
        d_grads = tape.gradient(d_loss, d_model.trainable_variables)
        d_opt.apply_gradients(zip(d_grads, d_model.trainable_variables, strict=True))
        steps.assign_add(1)
        if steps % 2 == 0:
            g_opt.apply_gradients(zip(g_grads, g_model.trainable_variables, strict=True))

    return step


# (`tf.cond` and fused calls: tests/test_examples.py, on the WGAN-GP example.)
@pytest.mark.parametrize(("use_cond", "k"), [(False, 1)])
def test_updates_under_control_flow_equal_the_hand_written_loop_under_the_guard(use_cond, k):
    """An update every second step, by autograph's `if`, under the default guard; a
    poisoned batch under "skip" changes neither state."""
    g, d = networks()
    ref_g, ref_d = twin(g), twin(d)
    ref_step = hand_written_alternating(ref_g, ref_d)
    s = states(g, d)
    tp.fold(tp.make_step(alternating(use_cond), steps_per_call=k), s, data(n=64))
    for batch in data(n=64):
        ref_step(*batch)
    assert int(s["d"].step) == 4 and int(s["g"].step) == 2
    for a, b in ((g, ref_g), (d, ref_d)):
        for va, vb in zip(a.variables, b.variables, strict=True):
            np.testing.assert_allclose(va.numpy(), vb.numpy(), rtol=1e-6, atol=1e-6)
    # The generator's update on a NaN batch (the fourth: d.step 4 -> update) is undone.
    g, d = networks()
    s, clean = states(g, d), states(*networks())
    skip = tp.make_step(alternating(use_cond), nonfinite="skip", steps_per_call=k)
    tp.fold(skip, s, data(n=64, poison_batch=3))
    tp.fold(tp.make_step(alternating(use_cond)), clean, data(n=48))
    assert int(s["g"].skipped) == 1 and int(s["d"].step) == 3 and int(s["g"].step) == 1
    for key in ("g", "d"):
        assert_close(everything(clean[key]), everything(s[key]), rtol=0, atol=0)


def test_autograph_false_traces_the_body_as_written():
    """Without autograph a Python `if` on a tensor is what TensorFlow refuses in a graph."""
    s = states(*networks())
    step = tp.make_step(alternating(use_cond=False), autograph=False)
    with pytest.raises(tf.errors.OperatorNotAllowedInGraphError, match="Python `bool`"):
        step(s, next(iter(data())))
    assert int(s["d"].step) == 0 and int(s["g"].step) == 0


def test_a_state_reassigned_inside_an_autograph_branch_is_named():
    def body(states, batch):
        g, d = states["g"], states["d"]
        if d.step % 2 == 0:
            d = d.apply_gradients([tf.zeros_like(v) for v in d.model.trainable_variables])
        return {"g": g, "d": d}, {}

    s = states(*networks())
    with pytest.raises(TypeError, match=r"\AA state was reassigned inside Python control flow"):
        tp.make_step(body)(s, next(iter(data())))
    assert int(s["d"].step) == 0


def test_messages_name_states_by_their_keys():
    """Two states whose models share a name are told apart by their keys; a body returning
    other keys is told which are missing and which are extra."""
    keras.utils.set_random_seed(0)
    online, target = (
        keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)], name="online")
        for _ in range(2)
    )
    s = {
        key: tp.TrainState.create(model=m, optimizer=keras.optimizers.SGD(0.1))
        for key, m in (("online", online), ("target", target))
    }

    def body(states, batch):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(states["target"].model(batch) * np.inf)
        states["target"].apply_gradients(tape.gradient(loss, target.trainable_variables))
        return states, {"loss": loss}

    batch = np.ones((2, 2), "float32")
    with pytest.raises(
        tp.NonFiniteError,
        match=r"\(states\['online'\] at step 0, states\['target'\] "
        r"at step 0\) met non-finite values: \[\"gradients of states\['target'\]\"",
    ):
        tp.make_step(body)(s, batch)
    renamed = tp.make_step(
        lambda states, batch: ({"online": states["online"], "t": states["target"]}, {})
    )
    with pytest.raises(
        TypeError,
        match=r"structure it was given: states\['target'\] is missing, "
        r"states\['t'\] is extra\.\Z",
    ):
        renamed(s, batch)


@pytest.mark.parametrize("known_length", [True, False])
def test_an_out_of_range_error_of_the_step_itself_is_raised_not_taken_for_the_datas_end(
    known_length,
):
    """At one step a call the data's end is the loop's `get_next` raising OutOfRangeError.
    The same error raised by the step past its batch (a body pulling from its own exhausted
    iterator) is an error of that step: raised, the state unchanged, not a quiet end;
    whether the window's steps count their batches (data of unknown length) or not (data
    of known length, which the loop asks for no more batches than it holds)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD(0.1))
    exhausted = iter(tf.data.Dataset.range(0))

    def body(state, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            scale = tf.cast(exhausted.get_next(), tf.float32)
            loss = tf.reduce_mean((state.model(x, training=True) - y) ** 2) * scale
        return state.apply_gradients(tape.gradient(loss, state.model.trainable_variables)), {
            "mse": loss
        }

    ones = np.ones((4, 2), "float32"), np.ones((4, 1), "float32")
    before = [v.numpy() for v in model.weights]
    data = tf.data.Dataset.from_tensor_slices(ones).batch(2)
    if not known_length:
        data = data.filter(lambda *_: True)
    step = tp.make_step(body)
    with pytest.raises(tf.errors.OutOfRangeError):
        tp.fit_loop(state, data, step, verbose=0)
    window = step.engine(state).window
    assert window.on_lasting.experimental_get_tracing_count() == int(known_length)
    assert window.on_next.experimental_get_tracing_count() == int(not known_length)
    assert int(state.step) == 0
    for v, value in zip(model.weights, before, strict=True):
        np.testing.assert_array_equal(v.numpy(), value)
