"""The examples, run by the tests: a GAN, an EMA-teacher distillation, SAM."""

import importlib.util
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import tfpure as tp

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
