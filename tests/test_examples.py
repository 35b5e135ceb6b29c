"""The examples, run by the tests: a GAN, WGAN-GP, BYOL, an EMA-teacher distillation, SAM."""

import importlib.util
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import tfpure as tp
from tfpure.state import owned_variables

from reference import twin


def load_example(name):
    path = Path(__file__).parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gan_learns_the_data_and_a_finished_checkpointed_run_does_nothing_again(tmp_path):
    gan = load_example("gan")
    args = ["--epochs", "40", "--checkpoint", str(tmp_path)]
    result = gan.main(args)
    assert abs(result["mean_before"]) < 1.0
    assert abs(result["mean"] - gan.TARGET_MEAN) < 0.5  # the generator moved to the data
    again = gan.main(args)  # restored from the last checkpoint, nothing trained
    assert again["mean"] == result["mean"] and again["std"] == result["std"]


def test_gan_generator_takes_noise_of_its_own_shape():
    gan = load_example("gan")
    states = gan.make_states(seed=3)
    assert states["g"].model.input_shape == (None, gan.NOISE) != (None, 1)
    states, logs = tp.make_step(gan.gan_step)(states, next(iter(gan.real_data())))
    assert sorted(logs) == ["d_loss", "g_loss"]
    assert int(states["g"].step) == int(states["d"].step) == 1


def test_distill_teacher_is_the_ema_of_the_student():
    distill = load_example("distill")
    states = distill.make_states(seed=0)
    train, _, _ = distill.load_digits_split(0)
    student, teacher = states["student"].model, states["teacher"].model
    expected = [v.numpy() for v in teacher.trainable_variables]
    step = tp.make_step(distill.distill_step)
    for batch in train.take(3):
        states, _ = step(states, batch)
        expected = [
            distill.DECAY * e + (1 - distill.DECAY) * s.numpy()
            for e, s in zip(expected, student.trainable_variables, strict=True)
        ]
    for e, t in zip(expected, teacher.trainable_variables, strict=True):
        np.testing.assert_allclose(t.numpy(), e, rtol=1e-5, atol=1e-6, err_msg=t.path)
    assert not np.allclose(expected[0], student.trainable_variables[0].numpy())  # it lags


def test_distill_trains_both_networks():
    result = load_example("distill").main(["--epochs", "8"])
    assert result["student"] > 0.75 and result["teacher"] > 0.75


def test_one_sam_step_equals_a_hand_computed_sam_update():
    sam = load_example("sam")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, "tanh"), keras.layers.Dense(3)]
    )
    reference = twin(model)
    state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD(0.5))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.integers(0, 3, size=16).astype("int32")
    state, _ = tp.make_step(lambda s, b: sam.sam_step(s, b, rho=0.5))(state, (x, y))

    weights = reference.trainable_variables
    with tf.GradientTape() as tape:
        loss = sam.CE(y, reference(x, training=True))
    grads = tape.gradient(loss, weights)
    norm = np.sqrt(sum(np.sum(g.numpy() ** 2) for g in grads))
    original = [w.numpy() for w in weights]
    for w, g in zip(weights, grads, strict=True):
        w.assign_add(0.5 * g / norm)
    with tf.GradientTape() as tape:
        sharp = tape.gradient(sam.CE(y, reference(x, training=True)), weights)
    plain = [w0 - 0.5 * g.numpy() for w0, g in zip(original, grads, strict=True)]
    for v, w0, g, p in zip(model.trainable_variables, original, sharp, plain, strict=True):
        np.testing.assert_allclose(v.numpy(), w0 - 0.5 * g.numpy(), rtol=1e-5, atol=1e-6)
        assert not np.allclose(v.numpy(), p, rtol=1e-5, atol=1e-6)  # not plain SGD


def test_sam_trains_the_digits():
    result = load_example("sam").main(["--epochs", "6"])
    assert result["val_accuracy"] > 0.9


def hand_written_wgan_gp(wgan, seed=0):
    """The WGAN-GP loop as a researcher writes it by hand: one `tf.function`, `tf.cond`."""
    states = wgan.make_states(seed)  # (the same networks; its own optimizers and seeds below)
    g, d = states["g"].model, states["d"].model
    g_opt, d_opt = (keras.optimizers.Adam(1e-3, beta_1=0.5, beta_2=0.9) for _ in "gd")
    g_opt.build(g.trainable_variables)
    d_opt.build(d.trainable_variables)
    g_rng, d_rng = keras.random.SeedGenerator(seed), keras.random.SeedGenerator(seed + 1)
    d_steps = tf.Variable(0, dtype=tf.int64)

    @tf.function
    def step(real):
        n = tf.shape(real)[0]
        z = keras.random.normal((n, wgan.NOISE), seed=g_rng)
        eps = keras.random.uniform((n, 1), seed=d_rng)
        with tf.GradientTape() as tape:
            d_loss, _ = wgan.critic_loss(g, d, real, z, eps)
        grads = tape.gradient(d_loss, d.trainable_variables)
        d_opt.apply_gradients(zip(grads, d.trainable_variables, strict=True))
        d_steps.assign_add(1)
        update = d_steps % wgan.N_CRITIC == 0

        def train_generator():
            with tf.GradientTape() as tape:
                loss = wgan.generator_loss(g, d, z)
            grads = tape.gradient(loss, g.trainable_variables)
            g_opt.apply_gradients(zip(grads, g.trainable_variables, strict=True))
            return loss

        return update, tf.cond(update, train_generator, lambda: tf.constant(0.0))

    return g, d, step


def test_wgan_gp_under_the_guard_equals_the_hand_written_loop_fused_and_skipping():
    """Five critic updates per generator update by `tf.cond`, under the default guard, at
    1 and 4 steps per call: the networks of the hand-written loop (1e-6), and the generator
    loss's epoch mean over the steps that updated it (batches of 32 and a ragged 8). "skip"
    of a poisoned batch (a generator step) leaves both as if it never came."""
    wgan = load_example("wgan_gp")
    data = wgan.ring_data(n=9 * 32 + 8, batch=32)  # 10 batches: updates at 5 and 10 (8 rows)
    g_ref, d_ref, ref_step = hand_written_wgan_gp(wgan)
    expected = []
    for _ in range(2):
        reported = [(float(loss), len(real)) for real in data
                    for update, loss in [ref_step(real)] if update]  # fmt: skip
        expected.append(sum(v * n for v, n in reported) / sum(n for _, n in reported))
    assert len(reported) == 2 and reported[1][1] == 8
    for k in (1, 4):
        states = wgan.make_states()
        step = tp.make_step(wgan.wgan_gp_step, steps_per_call=k)
        states, history = tp.fit_loop(states, data, step, epochs=2, verbose=0)
        assert int(states["d"].step) == 20 and int(states["g"].step) == 4
        np.testing.assert_allclose(history["g_loss"], expected, rtol=1e-5, atol=1e-6)
        for mine, ref in ((states["g"].model, g_ref), (states["d"].model, d_ref)):
            for a, b in zip(mine.variables, ref.variables, strict=True):
                np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-6)
    poisoned = data.enumerate().map(lambda i, x: tf.where(i == 4, x * np.nan, x))
    skipping, clean = wgan.make_states(), wgan.make_states()
    step = tp.make_step(wgan.wgan_gp_step, nonfinite="skip", steps_per_call=4)
    _, history = tp.fit_loop(skipping, poisoned, step, epochs=2, verbose=0)
    assert history["skipped"] == [1.0, 1.0]  # each epoch's own (the state counts 2)
    assert int(skipping["d"].skipped) == 2
    without = data.enumerate().filter(lambda i, x: i != 4).map(lambda i, x: x)
    tp.fit_loop(clean, without, tp.make_step(wgan.wgan_gp_step), epochs=2, verbose=0)
    for key in ("g", "d"):
        assert int(skipping[key].step) == int(clean[key].step)
        for a, b in zip(owned_variables(skipping[key]), owned_variables(clean[key]), strict=True):
            if a is not skipping[key].skipped:
                np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)


def test_byol_target_follows_by_ema_is_rolled_back_by_skip_and_restored(tmp_path):
    byol = load_example("byol")
    states = byol.make_states(seed=0)
    train, _, _ = byol.load_digits_split(0)
    online, target = states["online"].model, states["target"].model
    step = tp.make_step(byol.byol_step, nonfinite="skip")
    batches = list(train.take(3))
    states, _ = step(states, batches[0])
    before = [t.numpy() for t in target.variables]
    states, _ = step(states, batches[1])  # online trained, then the target follows it
    expected = [
        byol.DECAY * b + (1 - byol.DECAY) * o.numpy()
        for b, o in zip(before, online.variables, strict=True)
    ]
    for e, t in zip(expected, target.variables, strict=True):
        np.testing.assert_allclose(t.numpy(), e, rtol=1e-6, atol=1e-7, err_msg=t.path)
    ckpt = tp.Checkpointer(tmp_path)
    ckpt.save(states)
    saved = {k: [v.numpy() for v in owned_variables(s)] for k, s in states.items()}
    x, y = batches[2]
    states, logs = step(states, (x * np.nan, y))  # the target would turn NaN
    assert int(logs["skipped"]) == 1 and int(states["online"].step) == 2
    for key, state in states.items():
        for v, b in zip(owned_variables(state), saved[key], strict=True):
            if v is not state.skipped:
                np.testing.assert_array_equal(v.numpy(), b, err_msg=f"{key}: {v.name}")
    states, _ = step(states, batches[2])
    assert not np.array_equal(target.variables[0].numpy(), saved["target"][0])
    ckpt.restore(states)
    for key, state in states.items():
        for v, b in zip(owned_variables(state), saved[key], strict=True):
            np.testing.assert_array_equal(v.numpy(), b, err_msg=f"{key}: {v.name}")


def test_byol_lowers_its_loss():
    result = load_example("byol").main(["--epochs", "3"])
    assert result["loss"][-1] < 0.5 * result["loss"][0]
