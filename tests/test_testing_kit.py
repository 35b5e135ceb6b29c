"""tfpure.testing catches real bugs: each assertion against a bug planted for it.

A check that cannot fail is worthless, so each assertion is shown failing on
a step or model with a specific defect, and passing on the same code without
it.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import find, given, settings
from planted import WarmupStep, wrong_square

import tfpure as tp
from tfpure import testing as tpt
from tfpure.testing import strategies as tps
from tfpure.testing.strategies import ModelSpec

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
SPEC = ModelSpec((4,), (("dense", 8),), num_classes=3)


def with_layer(layer, spec=SPEC, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input(spec.input_shape), keras.layers.Dense(8), layer, keras.layers.Dense(3)]
    )


# -- a layer that ignores the training flag ----------------------------------------------


class DropsAtInference(keras.layers.Layer):
    """Bug: draws a dropout mask whatever `training` says."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(1)

    def call(self, x, training=None):
        return keras.random.dropout(x, 0.5, seed=self.seed_generator)


class NeverDrops(keras.layers.Dropout):
    """Bug: a Dropout that ignores training=True."""

    def call(self, inputs, training=False):
        return inputs


def test_training_flag_catches_randomness_at_inference():
    with pytest.raises(AssertionError, match="training=False is not deterministic"):
        tpt.assert_training_flag_respected(with_layer(DropsAtInference()), SPEC.batch(8, 0))


def test_training_flag_catches_a_dropout_that_never_drops():
    with pytest.raises(AssertionError, match=r"\['deaf'\] passed their inputs through"):
        tpt.assert_training_flag_respected(
            with_layer(NeverDrops(0.5, name="deaf")), SPEC.batch(8, 0)
        )
    tpt.assert_training_flag_respected(with_layer(keras.layers.Dropout(0.5)), SPEC.batch(8, 0))


def test_training_flag_names_a_deaf_dropout_among_working_ones():
    """The model as a whole draws new masks (the working Dropout does): only a per-layer
    check finds the deaf one, and names it."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input(SPEC.input_shape),
            keras.layers.Dense(8),
            keras.layers.Dropout(0.5, name="works"),
            keras.layers.Dense(8),
            NeverDrops(0.5, name="deaf"),
            keras.layers.Dense(3),
        ]
    )
    named = r"\['deaf'\] passed .* the model has \['works', 'deaf'\]"
    with pytest.raises(AssertionError, match=named):
        tpt.assert_training_flag_respected(model, SPEC.batch(8, 0))
    assert "call" not in vars(model.layers[1])  # the spies are gone


class FrozenNorm(keras.layers.BatchNormalization):
    """Bug: BatchNorm that always runs in inference mode."""

    def call(self, inputs, training=None, mask=None):
        return super().call(inputs, training=False, mask=mask)


def test_training_flag_catches_a_batchnorm_stuck_in_inference():
    with pytest.raises(AssertionError, match=r"moving statistics of \[.frozen_norm.\] unchanged"):
        tpt.assert_training_flag_respected(with_layer(FrozenNorm()), SPEC.batch(8, 0))


# -- a custom gradient that is wrong ---------------------------------------------------


@tf.custom_gradient
def right_square(x):
    def grad(dy):
        return dy * 2.0 * x

    return x * x, grad


class Square(keras.layers.Layer):
    def __init__(self, wrong=False, **kwargs):
        super().__init__(**kwargs)
        self.wrong = wrong

    def call(self, x):
        return wrong_square(x) if self.wrong else right_square(x)

    def get_config(self):
        return {**super().get_config(), "wrong": self.wrong}


def test_gradients_catch_a_wrong_custom_gradient():
    batch = SPEC.batch(6, 0)
    with pytest.raises(AssertionError, match="differ from central finite differences"):
        tpt.assert_gradients_match_numeric(with_layer(Square(wrong=True)), SCCE, batch)
    tpt.assert_gradients_match_numeric(with_layer(Square(wrong=False)), SCCE, batch)


@tf.custom_gradient
def square_wrong_near_zero(x):
    """Bug: the gradient of x² is 3x where |x| < 1 (only normalised inputs show it)."""

    def grad(dy):
        return dy * tf.cast(tf.where(tf.abs(x) < 1, 3.0, 2.0), x.dtype) * x

    return tf.square(x), grad


@keras.saving.register_keras_serializable("tfpure_tests")
class NearZeroSquare(keras.layers.Layer):
    def call(self, x):
        return square_wrong_near_zero(x)


def test_gradients_check_the_copy_behind_an_adapted_normalization():
    """The float64 copy keeps the adapted mean and variance, so a bug that only normalised
    inputs reach is caught (raw features ~ N(500, 10) keep |x| far above 1)."""
    rng = np.random.default_rng(0)
    x = rng.normal(500, 10, size=(16, 3)).astype("float32")
    y = rng.integers(0, 3, 16).astype("int32")
    norm = keras.layers.Normalization()
    norm.adapt(x)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((3,)), norm, keras.layers.Dense(4), NearZeroSquare(), keras.layers.Dense(3)]
    )
    with pytest.raises(AssertionError, match="differ from central finite differences"):
        tpt.assert_gradients_match_numeric(model, SCCE, (x, y))


def test_gradients_of_an_embedding_are_compared_dense():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(20, 4),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(3),
        ]
    )
    rng = np.random.default_rng(0)
    tokens, y = rng.integers(0, 20, (6, 5)).astype("int32"), rng.integers(0, 3, 6).astype("int32")
    tpt.assert_gradients_match_numeric(model, SCCE, (tokens, y))  # IndexedSlices gradients


class Shifted(keras.layers.Layer):
    """State outside variables and config: a copy built from the config loses it."""

    shift = 0.0

    def call(self, x):
        return x + self.shift


def test_gradients_refuse_a_copy_that_computes_another_function():
    layer = Shifted()
    layer.shift = 2.0
    model = keras.Sequential([keras.Input((4,)), layer, keras.layers.Dense(3)])
    with pytest.raises(AssertionError, match=r"copy of .* does not compute the model's outputs"):
        tpt.assert_gradients_match_numeric(model, SCCE, SPEC.batch(4, 0))


# -- Python-side state frozen into the graph -------------------------------------------


def make_state():
    return tp.TrainState.create(model=SPEC.build(0), optimizer=keras.optimizers.SGD(0.1))


def test_graph_matches_eager_catches_python_state_frozen_at_trace_time():
    batches = [SPEC.batch(6, i) for i in range(4)]
    with pytest.raises(AssertionError, match="compiled step and the same step run eagerly"):
        tpt.assert_graph_matches_eager(make_state, WarmupStep(), batches)
    tpt.assert_graph_matches_eager(make_state, tp.make_train_step(SCCE), batches)


def two_states():
    keras.utils.set_random_seed(0)
    return {
        name: tp.TrainState.create(
            model=keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]),
            optimizer=keras.optimizers.SGD(0.1),
        )
        for name in ("a", "b")
    }


def two_state_body(scale_b, **step_options):
    """One make_step body training two states; `scale_b()` scales the second's loss."""

    def body(states, batch):
        x, y = batch
        logs = {}
        for name, state in states.items():
            with tf.GradientTape() as tape:
                loss = SCCE(y, state.model(x, training=True))
                if name == "b":
                    loss = loss * scale_b()
            states[name] = state.apply_gradients(
                tape.gradient(loss, state.model.trainable_variables)
            )
            logs[f"{name}_loss"] = loss
        return states, logs

    return tp.make_step(body, **step_options)


def test_graph_matches_eager_on_several_states_names_the_state():
    batches = [SPEC.batch(6, i) for i in range(2)]
    tpt.assert_graph_matches_eager(two_states, two_state_body(lambda: 1.0), batches)
    calls = []

    def growing():  # bug: a Python counter, frozen at trace time in the graph
        calls.append(1)
        return float(len(calls))

    with pytest.raises(AssertionError, match=r"(?m)^  b model \S+: max \|graph - eager\|"):
        tpt.assert_graph_matches_eager(two_states, two_state_body(growing), batches)


def test_fused_matches_sequential_on_make_step_bodies_and_catches_python_state():
    """Several states without validation; one state validated by `eval_step=`."""
    data = tf.data.Dataset.from_tensor_slices(SPEC.batch(10, 0)).batch(3)
    tpt.assert_fused_matches_sequential(
        two_states,
        lambda k: two_state_body(lambda: 1.0, steps_per_call=k),
        data,
        steps_per_call=3,
    )

    def one_state_body(state, batch):
        states, logs = two_state_body(lambda: 1.0).spec.fn({"a": state}, batch)
        return states["a"], logs

    tpt.assert_fused_matches_sequential(
        lambda: two_states()["a"],
        lambda k: tp.make_step(one_state_body, steps_per_call=k),
        data,
        steps_per_call=3,
        eval_step=tp.make_eval_step(SCCE),
    )
    calls = []

    def growing():  # bug: a Python counter, frozen at trace time in each step's graph
        calls.append(1)
        return float(len(calls))

    with pytest.raises(AssertionError, match=r"(?s)steps_per_call=3 differs.*history b_loss"):
        tpt.assert_fused_matches_sequential(
            two_states,
            lambda k: two_state_body(growing, steps_per_call=k),
            data,
            steps_per_call=3,
        )


# -- an eval step that moves BatchNorm statistics --------------------------------------


def test_eval_step_pure_catches_an_eval_that_trains_batchnorm():
    def leaky_eval(model, batch, training):
        x, y = batch
        y_pred = model(x, training=True)  # bug: should be `training`
        return SCCE(y, y_pred), y_pred

    spec = ModelSpec((4,), (("dense", 8), ("batchnorm", 0)), num_classes=3)
    state = tp.TrainState.create(model=spec.build(0), optimizer=keras.optimizers.SGD())
    with pytest.raises(AssertionError, match="moving_mean"):
        tpt.assert_eval_step_pure(tp.make_eval_step(leaky_eval), state, spec.batch(8, 0))
    tpt.assert_eval_step_pure(tp.make_eval_step(SCCE), state, spec.batch(8, 0))


def test_eval_step_pure_on_several_states_names_the_state_that_moved():
    """A make_step body scoring two states, the second through training=True."""
    spec = ModelSpec((4,), (("dense", 8), ("batchnorm", 0)), num_classes=3)
    states = {
        name: tp.TrainState.create(model=spec.build(i), optimizer=keras.optimizers.SGD())
        for i, name in enumerate(("a", "b"))
    }

    def scores(leak):
        def body(states, batch):
            x, y = batch
            return states, {
                f"{name}_loss": SCCE(y, s.model(x, training=leak and name == "b"))
                for name, s in states.items()
            }

        return tp.make_step(body)

    tpt.assert_eval_step_pure(scores(leak=False), states, spec.batch(8, 0))
    with pytest.raises(AssertionError, match=r"(?m)^  b model: \S*moving_mean"):
        tpt.assert_eval_step_pure(scores(leak=True), states, spec.batch(8, 0))


# -- a step that retraces on every batch size ------------------------------------------


def hand_written_step(relax):
    model = SPEC.build(0)
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build(model.trainable_variables)

    @tf.function(reduce_retracing=relax)
    def train(x, y):
        with tf.GradientTape() as tape:
            loss = SCCE(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    def step(state, batch):
        return state, {"loss": train(*batch)}

    return step


def test_no_retrace_catches_a_step_that_traces_every_batch_size():
    batches = [SPEC.batch(n, n) for n in (8, 7, 6, 5, 4)]
    with pytest.raises(AssertionError, match="traced 5 times over 5 batches"):
        tpt.assert_no_retrace(hand_written_step(relax=False), None, batches, max_traces=2)
    tpt.assert_no_retrace(hand_written_step(relax=True), None, batches, max_traces=2)


@tf.function
def _module_level_double(x):  # reached from a step only through a global name
    return x * 2


def _global_step(state, batch):
    return state, {"loss": tf.reduce_sum(_module_level_double(batch[0]))}


def test_count_traces_finds_functions_behind_closures_methods_and_globals():
    sizes = [SPEC.batch(n, n) for n in (3, 4, 5)]
    # Behind an object's attribute: a tfpure Step, traced once for every batch size.
    step, state = WarmupStep(), make_state()
    with tpt.count_traces(step) as traces:
        assert traces() == 0
        for batch in sizes:
            state, _ = step(state, batch)
    assert traces() == 1
    # Behind a closure: a tf.function without relaxed shapes traces once per size.
    closed = hand_written_step(relax=False)
    with tpt.count_traces(closed) as traces:
        for batch in sizes:
            closed(None, batch)
    assert traces() == 3
    # Behind a global name of the step's module.
    with tpt.count_traces(_global_step) as traces:
        for batch in sizes:
            _global_step(None, batch)
    assert traces() == 3  # 3 shapes, exact signatures
    with tpt.count_traces(_global_step) as traces:  # counts only what happens inside
        _global_step(None, sizes[0])
    assert traces() == 0
    with pytest.raises(TypeError, match=r"reaches no tf\.function"):
        tpt.assert_no_retrace(lambda state, batch: (state, {}), None, [1, 2])


class Trainer:
    """A research trainer class: its update is a @tf.function method (one per instance)."""

    def __init__(self, relax):
        self.model = SPEC.build(0)
        self.optimizer = keras.optimizers.SGD(0.1)
        self.optimizer.build(self.model.trainable_variables)
        self.update = tf.function(self._update, reduce_retracing=relax)

    def _update(self, x, y):
        with tf.GradientTape() as tape:
            loss = SCCE(y, self.model(x, training=True))
        grads = tape.gradient(loss, self.model.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables, strict=True))
        return loss

    @tf.function
    def evaluate(self, x, y):  # a decorated method: the class holds it, not the instance
        return SCCE(y, self.model(x, training=False))

    def step(self, state, batch):
        return state, {"loss": self.update(*batch), "val_loss": self.evaluate(*batch)}


def test_no_retrace_finds_tf_function_methods_of_a_trainer_class():
    batches = [SPEC.batch(n, n) for n in (8, 7, 6)]
    trainer = Trainer(relax=True)
    with tpt.count_traces(trainer.step) as traces:
        for batch in batches:
            trainer.step(None, batch)
    assert traces() == 2 + 3  # update: first shape, then relaxed; evaluate: each shape
    with tpt.count_traces(trainer.step) as traces:  # only the traces made inside count
        trainer.step(None, batches[0])
    assert traces() == 0
    per_function = r"traced 5 times over 3 batches .*\{'_update': 2, 'evaluate': 3\}"
    with pytest.raises(AssertionError, match=per_function):
        tpt.assert_no_retrace(Trainer(relax=True).step, None, batches, max_traces=2)


# -- strategies ----------------------------------------------------------------------


@given(
    data=tps.batch_lists(
        {"x": tf.TensorSpec([None, 3], tf.float32), "n": tf.TensorSpec([None], tf.int64)},
        min_batches=2,
        int_high=5,
    )
)
def test_batches_follow_an_element_spec_with_ragged_sizes(data):
    for batch in data:
        size = batch["x"].shape[0]
        assert batch["x"].shape == (size, 3) and batch["x"].dtype == np.float32
        assert batch["n"].shape == (size,) and batch["n"].min() >= 0 and batch["n"].max() < 5


TOKENS = (
    {"tokens": tf.TensorSpec([None, None], tf.int32), "mask": tf.TensorSpec([None, None], tf.bool)},
    tf.TensorSpec([None], tf.int32),
)
BOUNDS = ({"tokens": 1000, "mask": None}, 3)  # a vocabulary and a class count


@given(data=tps.batch_lists(TOKENS, min_batches=2, int_high=BOUNDS))
def test_batches_take_a_bound_per_leaf_and_one_length_per_batch(data):
    for x, y in data:
        size, length = x["tokens"].shape
        assert x["mask"].shape == (size, length) and 1 <= length <= 6
        assert y.shape == (size,) and y.min() >= 0 and y.max() < 3
        assert x["tokens"].min() >= 0 and x["tokens"].max() < 1000


def test_lengths_vary_between_batches_and_tokens_use_their_own_bound():
    quick = settings(database=None, max_examples=200)
    lists = tps.batch_lists(TOKENS, min_batches=2, int_high=BOUNDS)
    varied = find(lists, lambda d: len({x["tokens"].shape[1] for x, _ in d}) > 1, settings=quick)
    assert len({x["tokens"].shape[1] for x, _ in varied}) > 1
    wide = find(tps.batches(TOKENS, int_high=BOUNDS), lambda b: b[0]["tokens"].max() >= 3)
    assert wide[1].max() < 3  # the labels' bound is the class count, not the vocabulary's
    with pytest.raises(ValueError, match="int_high must be an int or a structure like"):
        find(tps.batches(TOKENS, int_high=(5, 3)), lambda b: True)
    with pytest.raises(ValueError, match="No int_high bound for the integer leaf"):
        find(tps.batches(TOKENS, int_high=({"tokens": None, "mask": None}, 3)), lambda b: True)


# -- a step against the tutorial's hand-written step ------------------------------------

REGULARIZED = ModelSpec((4,), (("dense", 8), ("dropout", 30), ("batchnorm", 0)), 3, l2=0.01)


def regularized_state():
    return tp.TrainState.create(
        model=REGULARIZED.build(0),
        optimizer=keras.optimizers.Adam(0.01),
        metrics={"accuracy": keras.metrics.SparseCategoricalAccuracy()},
    )


def user_body(regularize=True, accuracy_updates=1):
    def body(state, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            y_pred = state.model(x, training=True)
            loss = SCCE(y, y_pred)
            if regularize:
                loss += tf.add_n(state.model.losses)
        state = state.apply_gradients(tape.gradient(loss, state.model.trainable_variables))
        state.metrics["loss"].update_state(loss, sample_weight=tf.shape(x)[0])
        for _ in range(accuracy_updates):
            state.metrics["accuracy"].update_state(y, y_pred)
        return state, {"loss": loss}

    return tp.make_step(body)


REFERENCE_BATCHES = [REGULARIZED.batch(n, i) for i, n in enumerate((8, 8, 5))]


@pytest.mark.parametrize(
    "step",
    [tp.make_train_step(SCCE), user_body()],
    ids=["make_train_step", "make_step-body"],
)
def test_step_matches_reference_passes_correct_steps(step):
    tpt.assert_step_matches_reference(regularized_state, step, SCCE, REFERENCE_BATCHES)


@pytest.mark.parametrize(
    ("step", "match"),
    [
        (user_body(regularize=False), r"model sequential\w*/dense\w*/kernel: max \|step - refer"),
        (user_body(accuracy_updates=2), r"metrics \S*total: max \|step - reference\| = "),
    ],
    ids=["forgets-model-losses", "metric-updated-twice"],
)
def test_step_matches_reference_catches_a_wrong_user_step(step, match):
    with pytest.raises(AssertionError, match=match):
        tpt.assert_step_matches_reference(regularized_state, step, SCCE, REFERENCE_BATCHES)


def test_step_matches_reference_needs_identical_states():
    with pytest.raises(AssertionError, match=r"make_state\(\) built two different states"):
        tpt.assert_step_matches_reference(
            lambda: tp.TrainState.create(
                model=keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]),
                optimizer=keras.optimizers.SGD(),
            ),
            tp.make_train_step(SCCE),
            SCCE,
            REFERENCE_BATCHES,
        )
