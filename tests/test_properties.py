"""Properties of tfpure's steps on random small models, through tfpure.testing."""

import keras
import numpy as np
from hypothesis import given, settings

import tfpure as tp
from tfpure import testing as tpt
from tfpure.testing import strategies as tps

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def fresh_state(spec, seed, optimizer=lambda: keras.optimizers.Adam(0.01)):
    def make():
        return tp.TrainState.create(
            model=spec.build(seed),
            optimizer=optimizer(),
            metrics={"accuracy": keras.metrics.SparseCategoricalAccuracy()},
        )

    return make


@settings(max_examples=3)
@given(spec=tps.model_specs(), seed=tps.seeds(), size=tps.st.integers(1, 6))
def test_tape_gradients_equal_finite_differences(spec, seed, size):
    tpt.assert_gradients_match_numeric(spec.build(seed), SCCE, spec.batch(size, seed))


@settings(max_examples=3)
@given(spec=tps.model_specs(), seed=tps.seeds(), size=tps.st.integers(2, 6))
def test_training_flag_is_respected(spec, seed, size):
    model = spec.build(seed)
    before = tpt.snapshot(model.variables)
    tpt.assert_training_flag_respected(model, spec.batch(size, seed))
    after = tpt.snapshot(model.variables)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # left as found


@settings(max_examples=3)
@given(spec=tps.model_specs(), seed=tps.seeds(), size=tps.st.integers(1, 6))
def test_eval_step_is_pure(spec, seed, size):
    state = fresh_state(spec, seed)()
    state, _ = tp.make_train_step(SCCE)(state, spec.batch(4, seed))  # non-trivial optimizer slots
    tpt.assert_eval_step_pure(tp.make_eval_step(SCCE), state, spec.batch(size, seed + 1))


@settings(max_examples=3)
@given(spec=tps.model_specs(), seed=tps.seeds(), data=tps.st.data())
def test_graph_matches_eager(spec, seed, data):
    batches = data.draw(tps.batch_lists(spec, max_batches=3))
    # SGD, not Adam: Adam divides near-zero gradients (a BatchNorm beta feeding
    # another BatchNorm) by their own size, blowing rounding noise up to lr.
    make_state = fresh_state(spec, seed, optimizer=lambda: keras.optimizers.SGD(0.1))
    tpt.assert_graph_matches_eager(make_state, tp.make_train_step(SCCE), batches)


@settings(max_examples=3)
@given(spec=tps.model_specs(), seed=tps.seeds(), data=tps.st.data())
def test_ragged_batches_never_retrace(spec, seed, data):
    batches = data.draw(tps.batch_lists(spec, min_batches=2, max_batches=5))
    step = tp.make_train_step(SCCE)
    tpt.assert_no_retrace(step, fresh_state(spec, seed)(), batches, max_traces=1)
