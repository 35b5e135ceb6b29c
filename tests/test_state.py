"""TrainState.create, replace and the invariants create establishes."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpure as tp
from tfpure.state import variable_groups
from tfpure.testing.strategies import ModelSpec

SPEC = ModelSpec((4,), (("dense", 5), ("dropout", 50), ("batchnorm", 0)), num_classes=3)


def test_create_builds_the_optimizer_on_exactly_the_trainable_variables():
    model = SPEC.build(0)
    optimizer = keras.optimizers.Adam()
    state = tp.TrainState.create(model=model, optimizer=optimizer)
    assert optimizer.built
    assert [id(v) for v in optimizer._trainable_variables] == [
        id(v) for v in model.trainable_variables
    ]
    # iterations + learning rate + two Adam slots per trainable variable
    assert len(optimizer.variables) == 2 + 2 * len(model.trainable_variables)
    assert state.step.dtype == tf.int64 and int(state.step) == 0 and state.step.shape == ()


def test_create_adds_a_loss_tracker_and_separate_eval_metrics():
    acc = keras.metrics.SparseCategoricalAccuracy()
    state = tp.TrainState.create(
        model=SPEC.build(0), optimizer=keras.optimizers.SGD(), metrics={"accuracy": acc}
    )
    assert list(state.metrics) == ["loss", "accuracy"] == list(state.eval_metrics)
    assert state.metrics["accuracy"] is acc
    for name in state.metrics:
        assert state.metrics[name] is not state.eval_metrics[name]
    assert isinstance(state.eval_metrics["accuracy"], keras.metrics.SparseCategoricalAccuracy)
    state.eval_metrics["accuracy"].update_state([0], [[1.0, 0.0, 0.0]])
    assert float(acc.count) == 0.0


def test_metrics_given_as_a_list_are_named_by_metric_name():
    state = tp.TrainState.create(
        model=SPEC.build(0),
        optimizer=keras.optimizers.SGD(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc"), keras.metrics.AUC()],
    )
    assert list(state.metrics) == ["loss", "acc", "auc"]


def test_unclonable_metrics_need_explicit_eval_metrics():
    def first(y_true, y_pred):
        return y_pred[:, 0]

    class Column(keras.metrics.MeanMetricWrapper):  # its config lacks `column`
        def __init__(self, column, name="column"):
            super().__init__(lambda t, p: p[:, column], name=name)

    with pytest.raises(ValueError, match="eval_metrics="):
        tp.TrainState.create(
            model=SPEC.build(0), optimizer=keras.optimizers.SGD(), metrics={"first": Column(0)}
        )
    state = tp.TrainState.create(
        model=SPEC.build(0),
        optimizer=keras.optimizers.SGD(),
        metrics={"first": keras.metrics.MeanMetricWrapper(first)},
        eval_metrics={"first": keras.metrics.MeanMetricWrapper(first)},
    )
    assert list(state.eval_metrics) == ["loss", "first"]


def test_seed_makes_dropout_masks_reproducible():
    def masks(seed):
        model = SPEC.build(0)
        state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD(), seed=seed)
        x = np.ones((8, 4), "float32")
        return model(x, training=True).numpy(), keras.random.uniform((3,), seed=state.rng).numpy()

    same_a, same_b, other = masks(7), masks(7), masks(8)
    np.testing.assert_array_equal(same_a[0], same_b[0])
    np.testing.assert_array_equal(same_a[1], same_b[1])
    assert not np.array_equal(same_a[0], other[0])


def test_replace_returns_a_new_frozen_state():
    state = tp.TrainState.create(model=SPEC.build(0), optimizer=keras.optimizers.SGD())
    other = state.replace(metrics={"loss": keras.metrics.Mean(name="loss")})
    assert other.model is state.model and other.metrics is not state.metrics
    with pytest.raises(AttributeError):
        state.step = None
    assert "step=0" in repr(state)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": "model"}, TypeError, "must be a keras.Model"),
        ({"optimizer": "adam"}, TypeError, "keras.optimizers.Optimizer"),
        ({"metrics": 3}, TypeError, "list of metrics"),
        ({"metrics": {"acc": 3}}, ValueError, "not a Keras metric"),
        ({"metrics": ["no_such_metric"]}, ValueError, "not a Keras metric"),
        ({"metrics": {"loss": keras.metrics.Mean()}}, ValueError, "may not use the name 'loss'"),
        (
            {"metrics": {"a": keras.metrics.Mean()}, "eval_metrics": {"b": keras.metrics.Mean()}},
            ValueError,
            "same names",
        ),
    ],
)
def test_create_rejects_bad_arguments(kwargs, error, match):
    arguments = {"model": SPEC.build(0), "optimizer": keras.optimizers.SGD(), **kwargs}
    with pytest.raises(error, match=match):
        tp.TrainState.create(**arguments)


def test_shared_metric_instances_are_refused():
    acc = keras.metrics.Mean()
    with pytest.raises(ValueError, match="share the instances"):
        tp.TrainState.create(
            model=SPEC.build(0),
            optimizer=keras.optimizers.SGD(),
            metrics={"m": acc},
            eval_metrics={"m": acc},
        )


def test_models_without_trainable_variables_are_refused():
    unbuilt = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="not built"):
        tp.TrainState.create(model=unbuilt, optimizer=keras.optimizers.SGD())
    frozen = SPEC.build(0)
    frozen.trainable = False
    with pytest.raises(ValueError, match="frozen"):
        tp.TrainState.create(model=frozen, optimizer=keras.optimizers.SGD())


def test_an_optimizer_built_for_another_model_is_refused():
    optimizer = keras.optimizers.Adam()
    tp.TrainState.create(model=SPEC.build(0), optimizer=optimizer)
    with pytest.raises(ValueError, match="built for other variables"):
        tp.TrainState.create(model=SPEC.build(1), optimizer=optimizer)


def test_a_state_without_an_optimizer_is_not_trained_and_says_so():
    """optimizer=None: a frozen model is welcome (the no-trainable-variables refusal is for
    an optimizer), its variables are the state's, and training it is refused by name."""
    frozen = SPEC.build(0)
    frozen.trainable = False
    state = tp.TrainState.create(model=frozen, optimizer=None)
    groups = variable_groups(state)
    assert groups["optimizer"] == [] and len(groups["model"]) == len(frozen.variables) > 0
    assert "optimizer=None" in repr(state)
    model = SPEC.build(1)
    untrained = tp.TrainState.create(model=model, optimizer=None)
    before = [v.numpy() for v in model.variables]
    grads = [tf.ones_like(v) for v in model.trainable_variables]
    with pytest.raises(
        ValueError, match=r"\Aapply_gradients on the state of model .* no optimizer"
    ):
        untrained.apply_gradients(grads)
    with pytest.raises(ValueError, match=r"\Amake_train_step trains .* the state has none"):
        tp.make_train_step("mse")(untrained, SPEC.batch(4, 0))
    for v, b in zip(model.variables, before, strict=True):
        np.testing.assert_array_equal(v.numpy(), b)
    assert int(untrained.step) == 0


def test_ema_averages_trainable_counterparts_and_refuses_what_cannot_be_averaged():
    source, target = SPEC.build(0), SPEC.build(1)  # (BatchNorm: statistics not averaged)
    before = {v.path: v.numpy() for v in target.variables}
    assert tp.ema(target, tp.TrainState.create(model=source, optimizer=None), 0.9) is target
    for t, s in zip(target.variables, source.variables, strict=True):
        expected = 0.9 * before[t.path] + (1 - 0.9) * s.numpy() if s.trainable else before[t.path]
        np.testing.assert_allclose(t.numpy(), expected, rtol=1e-6, atol=1e-7, err_msg=t.path)
    with pytest.raises(ValueError, match=r"same architecture: the target's variables"):
        tp.ema(target, ModelSpec((4,), (("dense", 3),), num_classes=2).build(0), 0.9)
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\]; got 1.5"):
        tp.ema(target, source, 1.5)
    with pytest.raises(TypeError, match=r"TrainStates or keras\.Models; got list"):
        tp.ema([target], source, 0.9)
