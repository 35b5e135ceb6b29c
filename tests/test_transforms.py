"""grad_transform: transforms against Keras' own options, composition order, loss scaling."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpure as tp
from tfpure import transforms
from tfpure.testing.strategies import ModelSpec

from reference import twin

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
SPEC = ModelSpec((5,), (("dense", 8), ("dense", 6)), num_classes=3, l2=0.01)


def state_for(model, optimizer):
    return tp.TrainState.create(model=model, optimizer=optimizer)


def run(state, step, n=4):
    for i in range(n):
        state, _ = step(state, SPEC.batch(6, i))
    return state


def test_clip_by_global_norm_equals_keras_global_clipnorm():
    model = SPEC.build(0)
    reference = twin(model)
    run(
        state_for(model, keras.optimizers.SGD(0.5)),
        tp.make_train_step(SCCE, grad_transform=transforms.clip_by_global_norm(0.05)),
    )
    run(
        state_for(reference, keras.optimizers.SGD(0.5, global_clipnorm=0.05)),
        tp.make_train_step(SCCE),
    )
    for a, b in zip(model.variables, reference.variables, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)


def test_mask_gradients_freezes_variables_under_sgd():
    model = SPEC.build(1)
    before = [v.numpy() for v in model.trainable_variables]
    keep_bias = transforms.mask_gradients(lambda v: v.path.endswith("bias"))
    run(
        state_for(model, keras.optimizers.SGD(0.1)),
        tp.make_train_step(SCCE, grad_transform=keep_bias),
    )
    for v, old in zip(model.trainable_variables, before, strict=True):
        moved = not np.array_equal(v.numpy(), old)
        assert moved == v.path.endswith("bias"), v.path


def test_transforms_compose_in_list_order():
    def double(grads, variables):
        return [g * 2 for g in grads]

    clip = transforms.clip_by_global_norm(0.01)
    models = [SPEC.build(2) for _ in range(3)]
    for i in (1, 2):
        for a, b in zip(models[0].variables, models[i].variables, strict=True):
            b.assign(a)
    listed = [double, clip]  # clip last: the norm ends at 0.01

    def by_hand(grads, variables):
        return clip(double(grads, variables), variables)

    run(
        state_for(models[0], keras.optimizers.SGD(0.1)),
        tp.make_train_step(SCCE, grad_transform=listed),
    )
    run(
        state_for(models[1], keras.optimizers.SGD(0.1)),
        tp.make_train_step(SCCE, grad_transform=by_hand),
    )
    run(
        state_for(models[2], keras.optimizers.SGD(0.1)),
        tp.make_train_step(SCCE, grad_transform=[clip, double]),
    )
    for a, b, c in zip(*(m.variables for m in models), strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
        assert not np.allclose(a.numpy(), c.numpy()) or "bias" in a.path  # order matters


def test_gradient_noise_is_reproducible_from_its_seed_and_drawn_anew_each_step():
    def trained(seed):
        model = SPEC.build(3)
        noise = transforms.add_gradient_noise(0.5, seed=seed)
        run(
            state_for(model, keras.optimizers.SGD(0.1)),
            tp.make_train_step(SCCE, grad_transform=noise),
        )
        return [v.numpy() for v in model.variables]

    a, b, c = trained(1), trained(1), trained(2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    seen = []

    def record(grads, variables):
        seen.append(1)
        return grads

    state = state_for(SPEC.build(3), keras.optimizers.SGD(0.1))
    noise = transforms.add_gradient_noise(1.0, seed=state.rng)
    before = state.rng.state.numpy().copy()
    run(state, tp.make_train_step(SCCE, grad_transform=[noise, record]), n=3)
    assert not np.array_equal(state.rng.state.numpy(), before)  # the state's generator advanced
    assert seen == [1]  # Python runs once, at trace time; the noise is drawn in the graph


def test_transforms_see_unscaled_gradients_under_loss_scaling():
    norms = {}

    def record(name):
        holder = tf.Variable(0.0)
        norms[name] = holder

        def transform(grads, variables):
            holder.assign(tf.linalg.global_norm(grads))
            return grads

        return transform

    model = SPEC.build(4)
    other = twin(model)
    scaled = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=2.0**10)
    run(
        state_for(model, keras.optimizers.SGD(0.1)),
        tp.make_train_step(SCCE, grad_transform=record("plain")),
        n=1,
    )
    run(state_for(other, scaled), tp.make_train_step(SCCE, grad_transform=record("scaled")), n=1)
    assert float(norms["plain"]) == pytest.approx(float(norms["scaled"]), rel=1e-5)
    for a, b in zip(model.variables, other.variables, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: transforms.clip_by_global_norm(0), "max_norm"),
        (lambda: transforms.add_gradient_noise(-1.0), "stddev"),
    ],
)
def test_transform_arguments_are_checked(make, match):
    with pytest.raises(ValueError, match=match):
        make()
