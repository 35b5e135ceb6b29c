"""`predict`: a model's outputs on a dataset, batches pulled inside the graph.

The forward pass (``model(x, training=False)``) is one `tf.function`, traced
once per input signature; the loop over batches is another. With one step a
call (the default) it is straight-line, ``iterator.get_next()`` and the
forward pass, and the end of the data ends the loop (an `OutOfRangeError`, as
in Keras' own predict loop): no loop or branch to trace and optimise, which
shortens a first call. With `steps_per_call` > 1 it runs up to that many
forward passes per call in a `tf.while_loop` over
``iterator.get_next_as_optional()`` and concatenates their outputs in
`tf.TensorArray`s. Both functions are kept per model, so calling `predict`
again on data of the same element spec traces nothing.
"""

from __future__ import annotations

import weakref
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfpure.arrays import from_arrays
from tfpure.batch import check_batch, loop_over_batches, unpack
from tfpure.state import TrainState
from tfpure.types import check_count

__all__ = ["predict"]


class _Predictor:
    """The two graph functions of one model and one `steps_per_call`."""

    def __init__(self, model: keras.Model, steps_per_call: int):
        self.steps_per_call = steps_per_call
        self.forward = tf.function(
            lambda x: model(check_batch(model, x, None, None), training=False),
            reduce_retracing=True,
            autograph=False,
        )
        self.loop = tf.function(self._loop, autograph=False)

    def forward_for(self, element_spec: Any) -> Any:
        """The forward pass's concrete function for batches of `element_spec`."""
        features = unpack(element_spec)[0]
        spec = tf.nest.map_structure(lambda s: tf.TensorSpec(s.shape, s.dtype), features)
        return self.forward.get_concrete_function(spec)

    def _loop(self, iterator: Any) -> tuple[tf.Tensor, list[tf.Tensor]]:
        forward = self.forward_for(iterator.element_spec)
        specs = tf.nest.flatten(forward.structured_outputs)
        if self.steps_per_call == 1:  # straight-line; the data's end raises (see `predict`)
            batch = iterator.get_next()
            return tf.constant(1), tf.nest.flatten(forward(unpack(batch)[0]))
        arrays = [
            tf.TensorArray(s.dtype, size=0, dynamic_size=True, infer_shape=False) for s in specs
        ]

        def step(i: tf.Tensor, batch: Any, arrays: tuple) -> tuple:
            outputs = tf.nest.flatten(forward(unpack(batch)[0]))
            return tuple(a.write(i, y) for a, y in zip(arrays, outputs, strict=True))

        i, arrays = loop_over_batches(
            lambda i: iterator.get_next_as_optional(),
            iterator.element_spec,
            self.steps_per_call,
            step,
            tuple(arrays),
        )
        # No batch left (the data ended at a call boundary): nothing to concatenate.
        return i, [
            tf.cond(i > 0, a.concat, lambda s=s: tf.zeros([0], s.dtype))
            for a, s in zip(arrays, specs, strict=True)
        ]


_PREDICTORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _predictor(model: keras.Model, steps_per_call: int) -> _Predictor:
    per_model = _PREDICTORS.setdefault(model, {})
    if steps_per_call not in per_model:
        per_model[steps_per_call] = _Predictor(model, steps_per_call)
    return per_model[steps_per_call]


def predict(
    state: TrainState | keras.Model,
    data: tf.data.Dataset,
    *,
    steps_per_call: int = 1,
    verbose: int = 0,
    batch_size: int | None = None,
) -> Any:
    """The model's outputs on every batch of `data`, as Keras' `model.predict` gives them.

    Each batch's features (``x`` of ``x``, ``(x,)``, ``(x, y)`` or
    ``(x, y, sample_weight)``) go through ``model(x, training=False)``;
    outputs are concatenated over batches. Batches are pulled inside the
    graph, `steps_per_call` per call; the functions are kept per model, so
    another call on data of the same element spec traces nothing. One model
    at a time (for several states, call it per state), on one device: under a
    `tf.distribute` strategy the batches are not split across replicas.

    Args:
      state: a `TrainState` (its model predicts) or a Keras model.
      data: a `tf.data.Dataset` of batches; with `batch_size`, the features
        as arrays (``x``, or a dict of arrays by input name).
      steps_per_call: batches per graph call.
      verbose: 1 shows Keras' progress bar (one step per batch).
      batch_size: slice arrays given as `data` into batches of this size, in
        order (as Keras `predict` does).

    Returns:
      NumPy arrays in the model's output structure: one array, or a dict or
      list of them for a multi-output model.

    Raises:
      TypeError: `data` is not a `tf.data.Dataset`, or `state` holds no model.
      ValueError: `steps_per_call` < 1, or `data` held no batch.

    Example:
      >>> import keras, numpy as np, tensorflow as tf, tfpure as tp
      >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, use_bias=False)])
      >>> model.set_weights([np.array([[1.0], [2.0]], "float32")])
      >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())
      >>> data = tf.data.Dataset.from_tensor_slices(np.eye(2, dtype="float32")).batch(1)
      >>> tp.predict(state, data).tolist()
      [[1.0], [2.0]]
      >>> tp.predict(state, np.eye(2, dtype="float32"), batch_size=1).tolist()
      [[1.0], [2.0]]
    """
    model = state.model if isinstance(state, TrainState) else state
    if not isinstance(model, keras.Model):
        raise TypeError(f"predict takes a TrainState or a Keras model; got {type(state).__name__}.")
    data = from_arrays(data, batch_size)
    if not isinstance(data, tf.data.Dataset):
        raise TypeError(
            "predict takes `data` as a tf.data.Dataset of batches, or arrays with "
            "batch_size= (predict(state, x, batch_size=32)); got "
            f"{type(data).__name__}."
        )
    check_count("steps_per_call", steps_per_call)
    predictor = _predictor(model, steps_per_call)
    cardinality = int(data.cardinality())
    progbar = (
        keras.utils.Progbar(cardinality if cardinality >= 0 else None, verbose=verbose)
        if verbose
        else None
    )
    parts: list[list[np.ndarray]] = []
    done = 0
    iterator = iter(data)
    while True:
        try:
            steps, outputs = predictor.loop(iterator)
        except tf.errors.OutOfRangeError:  # (one step a call: the data ended)
            break
        steps = int(steps)
        if steps:
            parts.append([o.numpy() for o in outputs])
            done += steps
            if progbar is not None:
                progbar.update(done)
        if steps < steps_per_call:
            break
    if not parts:
        raise ValueError("`data` held no batch: there is nothing to predict.")
    structure = predictor.forward_for(data.element_spec).structured_outputs
    flat = [np.concatenate(leaf) for leaf in zip(*parts, strict=True)]
    return tf.nest.pack_sequence_as(structure, flat)
