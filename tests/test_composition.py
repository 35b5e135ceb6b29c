"""Research composition: gradient accumulation, mixed precision, two states in one fold."""

import keras
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import tfpure as tp
from tfpure.state import owned_variables
from tfpure.testing import strategies as tps

from reference import twin

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@settings(max_examples=3)  # each example traces two steps
@given(
    spec=tps.model_specs(dropout=False, batchnorm=False),
    k=st.integers(2, 4),
    size=st.integers(1, 5),
    seed=tps.seeds(),
    adam=st.booleans(),
)
def test_gradient_accumulation_equals_one_batch_k_times_larger(spec, k, size, seed, adam):
    """Keras' gradient_accumulation_steps=k over k batches == one step on their union."""

    def optimizer(**kwargs):
        return (
            keras.optimizers.Adam(0.01, **kwargs) if adam else keras.optimizers.SGD(0.1, **kwargs)
        )

    model = spec.build(seed)
    other = twin(model)
    batches = [spec.batch(size, seed + i) for i in range(k)]
    union = tuple(np.concatenate(part) for part in zip(*batches, strict=True))
    big = tp.TrainState.create(model=model, optimizer=optimizer())
    big, _ = tp.make_train_step(SCCE)(big, union)
    small = tp.TrainState.create(model=other, optimizer=optimizer(gradient_accumulation_steps=k))
    step = tp.make_train_step(SCCE)
    for i, batch in enumerate(batches):
        if i < k - 1:  # nothing moves until the k-th batch
            before = [v.numpy() for v in other.trainable_variables]
        small, _ = step(small, batch)
        if i < k - 1:
            assert all(
                np.array_equal(v.numpy(), b)
                for v, b in zip(other.trainable_variables, before, strict=True)
            )
    for a, b in zip(model.trainable_variables, other.trainable_variables, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)


def test_mixed_precision_trains_and_skips_overflowing_steps():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        spec = tps.ModelSpec(
            (6,), (("dense", 16), ("batchnorm", 0), ("dropout", 20), ("dense", 16)), num_classes=3
        )
        model = spec.build(0)
        assert model.layers[0].compute_dtype == "float16"
        # A scale so large that the float16 backward pass overflows at first.
        optimizer = keras.optimizers.LossScaleOptimizer(
            keras.optimizers.Adam(0.01), initial_scale=2.0**40
        )
        state = tp.TrainState.create(model=model, optimizer=optimizer)
        step = tp.make_train_step(SCCE)  # nonfinite="raise": an overflow is no error
        x, y = spec.batch(32, 0)
        untrained = float(SCCE(y, model(x)))
        kept = [v for v in owned_variables(state) if v is not optimizer.dynamic_scale]
        before = [v.numpy() for v in kept]
        state, _ = step(state, (x, y))
        assert float(optimizer.dynamic_scale) == 2.0**39  # halved, and kept
        # The skipped step is put back whole: weights, BatchNorm statistics, Dropout's
        # seed, the step counter, the metrics.
        for v, b in zip(kept, before, strict=True):
            np.testing.assert_array_equal(v.numpy(), b, err_msg=v.name)
        assert int(state.step) == 0 and float(state.metrics["loss"].count) == 0
        for _ in range(200):
            state.reset_metrics()
            state, logs = step(state, (x, y))
        assert float(optimizer.dynamic_scale) < 2.0**20  # found a workable scale
        assert int(optimizer.inner_optimizer.iterations) > 100  # and applied most steps since
        assert int(state.step) == int(optimizer.inner_optimizer.iterations)
        assert float(logs["loss"]) < 0.7 * untrained
    finally:
        keras.mixed_precision.set_global_policy(previous)
