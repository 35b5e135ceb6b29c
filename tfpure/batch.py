"""Batches and losses: what a step reads from a batch and how it scores it.

A batch follows the Keras convention: `x`, `(x,)`, `(x, y)` or
`(x, y, sample_weight)`, where `x` may be a tensor, a tuple or a dict. A loss
is one of

  * a `keras.losses.Loss` (or a Keras loss name such as ``"mse"``);
  * any callable ``(y_true, y_pred) -> loss``, wrapped exactly as
    `model.compile` wraps it (`keras.losses.LossFunctionWrapper`: per-sample
    values are averaged, sample weights applied);
  * a full-control callable ``(model, batch, training) -> (loss, y_pred)``,
    for anything that needs `x`, several model calls or several outputs.

`as_model_loss` turns each into the third form. All checks here run while a
step is traced, in Python, so bad input fails before the graph runs and
before any variable changes. `loop_over_batches` is the in-graph loop of
steps over batches pulled from an iterator that training, evaluation,
prediction and replay share.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Protocol

import keras
import tensorflow as tf

# The wrapper `model.compile` puts around plain loss functions; Keras does not
# export it, and tfpure must score exactly as `fit` does.
from tfpure.compat import LossFunctionWrapper, model_input_structure

__all__ = [
    "LossFn",
    "ModelLossFn",
    "as_model_loss",
    "batch_size",
    "check_batch",
    "check_batch_sizes",
    "check_batch_values",
    "loop_over_batches",
    "required_positional",
    "targets_loss",
    "unpack",
]

Batch = Any


class LossFn(Protocol):
    """A loss of targets and predictions, like every `keras.losses.Loss`.

    Example:
      >>> import tensorflow as tf, tfpure as tp
      >>> def mean_abs(y_true, y_pred):  # a LossFn; make_train_step wraps it as compile does
      ...     return tf.reduce_mean(tf.abs(y_true - y_pred), axis=-1)
      >>> step = tp.make_train_step(mean_abs)
    """

    def __call__(self, y_true: Any, y_pred: Any, /) -> tf.Tensor: ...


class ModelLossFn(Protocol):
    """A full-control loss: calls the model itself, returns loss and predictions.

    Return `y_pred=None` when there are no metrics to update.

    Example:
      >>> import keras, tensorflow as tf, tfpure as tp
      >>> def denoise(model, batch, training):  # x is its own target
      ...     x = batch
      ...     noisy = x + keras.random.normal(tf.shape(x), stddev=0.1, seed=1)
      ...     y_pred = model(noisy, training=training)
      ...     return tf.reduce_mean(tf.square(y_pred - x)), y_pred
      >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4)])
      >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD(0.1))
      >>> state, logs = tp.make_train_step(denoise)(state, tf.ones((8, 4)))
      >>> sorted(logs), int(state.step)
      (['loss'], 1)
    """

    def __call__(
        self, model: keras.Model, batch: Batch, training: bool, /
    ) -> tuple[tf.Tensor, Any]: ...


def unpack(batch: Batch) -> tuple[Any, Any, Any]:
    """Splits a Keras-convention batch into `(x, y, sample_weight)`.

    Raises:
      ValueError: the batch is a tuple of more than three parts or holds no
        tensors.

    Example:
      >>> import tensorflow as tf
      >>> from tfpure.batch import unpack
      >>> x, y, w = unpack((tf.ones((2, 3)), tf.zeros((2,))))
      >>> x.shape, y.shape, w
      (TensorShape([2, 3]), TensorShape([2]), None)
    """
    if isinstance(batch, list):
        batch = tuple(batch)
    if not isinstance(batch, tuple):
        x, y, sample_weight = batch, None, None
    elif len(batch) in (1, 2, 3):
        x, y, sample_weight = (*batch, None, None)[:3]
    else:
        raise ValueError(
            "A batch must be x, (x,), (x, y) or (x, y, sample_weight); got a "
            f"tuple of {len(batch)} parts. Nest multi-input features: "
            "((x1, x2), y) or ({'a': x1, 'b': x2}, y)."
        )
    if x is None or not tf.nest.flatten(x):
        raise ValueError(
            f"The batch has no features `x` (found {'None' if x is None else 'an empty structure'}"
            "): a batch is x, (x, y) or (x, y, sample_weight), the features first."
        )
    return x, y, sample_weight


def batch_size(x: Any) -> tf.Tensor:
    """The number of examples in features `x`: the first dimension of its first tensor.

    Example:
      >>> import tensorflow as tf
      >>> from tfpure.batch import batch_size
      >>> int(batch_size({"a": tf.ones((5, 2)), "b": tf.ones((5,))}))
      5
    """
    return tf.shape(tf.nest.flatten(x)[0])[0]


def loop_over_batches(
    next_batch: Callable[[tf.Tensor], Any],
    element_spec: Any,
    k: Any,
    step: Callable[[tf.Tensor, Any, tuple], tuple],
    carry: tuple,
    go_on: Callable[[tuple], tf.Tensor] | None = None,
) -> tuple[tf.Tensor, tuple]:
    """Up to `k` steps in a `tf.while_loop`, each on its own batch: (steps run, carry).

    ``next_batch(i)`` gives step i's batch (of `element_spec`) as a
    `tf.experimental.Optional`, empty at the data's end, which ends the loop;
    ``step(i, batch, carry)`` returns the new carry (a tuple of loop
    values). Whether a batch came is the loop's condition, and each step
    pulls the next batch at its end, only if that step is due (``i < k``
    and, if given, ``go_on(carry)``), as Keras' `multi_step_on_iterator`
    runs its steps: the step runs in no branch (a branch on its batch's
    arrival would pass everything the step captures, every variable,
    through a switch at every step).

    Example:
      >>> import tensorflow as tf
      >>> from tfpure.batch import loop_over_batches
      >>> @tf.function
      ... def total(iterator, k):
      ...     return loop_over_batches(
      ...         lambda i: iterator.get_next_as_optional(), iterator.element_spec, k,
      ...         lambda i, batch, carry: (carry[0] + batch,), (tf.constant(0, tf.int64),))
      >>> iterator = iter(tf.data.Dataset.range(5))
      >>> [(int(n), int(s)) for n, (s,) in (total(iterator, 3), total(iterator, 3))]
      [(3, 3), (2, 7)]
    """
    empty = tf.experimental.Optional.empty(element_spec)

    def pull(i: tf.Tensor, carry: tuple) -> Any:
        due = i < k if go_on is None else tf.logical_and(i < k, go_on(carry))
        return tf.cond(due, lambda: next_batch(i), lambda: empty)

    def body(i: tf.Tensor, batch: Any, *carry: Any) -> tuple:
        carry = tuple(step(i, batch.get_value(), carry))
        return (i + 1, pull(i + 1, carry), *carry)

    i = tf.constant(0)
    i, _, *out = tf.while_loop(
        lambda i, batch, *carry: batch.has_value(), body, (i, pull(i, carry), *carry)
    )
    return i, tuple(out)


def _spec_shape(t: Any) -> tf.TensorShape:
    return tf.TensorShape(getattr(t, "shape", None))


def check_batch(model: keras.Model, x: Any, y: Any, sample_weight: Any) -> Any:
    """Checks features against the model's declared inputs, and batch sizes agree.

    Models without declared inputs (subclassed models) are checked by their
    own layers instead. Returns `x`; where the data leaves a feature size
    unknown (``Dataset.concatenate`` of other sizes), `x` waiting on a
    run-time check of it, which names the input and the batch's shape.
    """
    inputs = model_input_structure(model)
    flat_x = tf.nest.flatten(x)
    late = []
    if inputs is not None:
        flat_in = tf.nest.flatten(inputs)
        if len(flat_in) != len(flat_x):
            raise ValueError(
                f"Model {model.name!r} takes {len(flat_in)} input(s) "
                f"{[tuple(i.shape) for i in flat_in]} but the batch's features "
                f"hold {len(flat_x)} tensor(s) {[tuple(_spec_shape(t)) for t in flat_x]}."
            )
        for i, (spec, got) in enumerate(zip(flat_in, flat_x, strict=True)):
            want, have = tf.TensorShape(spec.shape), _spec_shape(got)
            want_dtype = tf.as_dtype(spec.dtype)
            have_dtype = tf.as_dtype(getattr(got, "dtype", want_dtype))
            numeric = have_dtype.is_floating or have_dtype.is_integer or have_dtype.is_bool
            if want_dtype.is_floating and not numeric:
                raise ValueError(
                    f"Feature dtype mismatch for model {model.name!r} input {i} "
                    f"({getattr(spec, 'name', '?')}): expected numbers ({want_dtype.name}), "
                    f"got {have_dtype.name}. Convert the features before training."
                )
            if not want.is_compatible_with(have):
                raise ValueError(
                    f"Feature shape mismatch for model {model.name!r} input {i} "
                    f"({getattr(spec, 'name', '?')}): expected {tuple(want)} "
                    f"(None = any size), got {tuple(have)}."
                )
            unknown = [
                a for a in range(1, want.rank or 0) if want[a] is not None and have[a] is None
            ]
            if unknown and isinstance(got, tf.Tensor):
                sizes = tf.gather(tf.shape(got), unknown)
                late.append(
                    tf.debugging.Assert(
                        tf.reduce_all(tf.equal(sizes, [want[a] for a in unknown])),
                        [
                            f"Feature shape mismatch for model {model.name} input {i} "
                            f"({getattr(spec, 'name', '?')}): expected {tuple(want)} (None = "
                            "any size); the data left it open, and this batch has "
                            "the shape",
                            tf.shape(got),
                            "(nothing of the batch was applied)",
                        ],
                    )
                )
    check_batch_sizes(x, y, sample_weight)
    if not late:
        return x
    with tf.control_dependencies(late):  # before the model sees the batch
        return tf.nest.map_structure(tf.identity, x)


def check_batch_sizes(x: Any, y: Any, sample_weight: Any) -> None:
    """Raises if `x`, `y` and `sample_weight` have different known batch sizes.

    Example:
      >>> import numpy as np
      >>> from tfpure.batch import check_batch_sizes
      >>> check_batch_sizes(np.ones((4, 2)), np.ones(3), None)
      Traceback (most recent call last):
      ...
      ValueError: The batch's parts disagree on the number of examples: {'x': 4, 'y': 3}.
    """
    known = {}
    for part, value in (("x", x), ("y", y), ("sample_weight", sample_weight)):
        for leaf in tf.nest.flatten(value) if value is not None else ():
            shape = getattr(leaf, "shape", None)
            shape = None if shape is None else tf.TensorShape(shape)
            if shape is not None and shape.rank and shape[0] is not None:
                known.setdefault(part, int(shape[0]))
    if len(set(known.values())) > 1:
        raise ValueError(f"The batch's parts disagree on the number of examples: {known}.")
    if 0 in known.values():
        raise ValueError(
            f"The batch has no examples ({known}): a step needs at least one. Filter empty "
            "batches out of the data."
        )


def check_batch_values(batch: Batch) -> None:
    """Raises if the batch holds Python numbers (nested lists) instead of arrays.

    Example:
      >>> from tfpure.batch import check_batch_values
      >>> check_batch_values(([[1.0, 2.0]], [0]))  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      TypeError: The batch holds Python numbers (a nested list?) where a step takes arrays ...
    """
    if any(isinstance(leaf, int | float | bool) for leaf in tf.nest.flatten(batch)):
        raise TypeError(
            "The batch holds Python numbers (a nested list?) where a step takes arrays or "
            "tensors: pass NumPy arrays (np.asarray) or a tf.data.Dataset."
        )


def required_positional(fn: Callable[..., Any]) -> int | None:
    """How many positional arguments `fn` requires (None if it has no signature)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds and p.default is inspect.Parameter.empty for p in params)


def as_model_loss(loss: Any, *, dtype: str | None = None) -> ModelLossFn:
    """Normalises a loss to the full-control form `(model, batch, training)`.

    `dtype`, if given, is the dtype a Keras loss computes in (Keras losses
    compute in float32 by default); a full-control loss is used as it is.

    Returns:
      The full-control function.

    Raises:
      TypeError: `loss` is not callable or takes neither two nor three
        positional arguments.

    Example:
      >>> import keras, tensorflow as tf
      >>> from tfpure.batch import as_model_loss
      >>> fn = as_model_loss(keras.losses.MeanSquaredError())
      >>> model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False)])
      >>> model.set_weights([tf.ones((1, 1))])
      >>> loss, y_pred = fn(model, (tf.ones((2, 1)), tf.zeros((2, 1))), False)
      >>> float(loss)
      1.0
    """
    name = loss if isinstance(loss, str) else None
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if not callable(loss):
        raise TypeError(
            "`loss` must be a keras.losses.Loss, a callable (y_true, y_pred) -> "
            "loss, or a callable (model, batch, training) -> (loss, y_pred); got "
            f"{type(loss).__name__}: {loss!r}."
        )
    if isinstance(loss, keras.losses.Loss):
        if dtype is not None:
            loss = type(loss).from_config({**loss.get_config(), "dtype": dtype})
        return targets_loss(loss)
    arity = required_positional(loss)
    if arity == 3:
        return loss
    if arity == 2:
        name = name or getattr(loss, "__name__", type(loss).__name__)
        return targets_loss(LossFunctionWrapper(loss, name=name, dtype=dtype))
    raise TypeError(
        f"`loss` {loss!r} takes {arity} required positional arguments; expected "
        "2 (y_true, y_pred) or 3 (model, batch, training)."
    )


# Reductions after which Keras divides a loss by the number of replicas in sync.
MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")


def targets_loss(loss: keras.losses.Loss) -> ModelLossFn:
    """A Keras loss of ``(y, model(x), sample_weight)`` as a full-control loss."""

    def model_loss(model: keras.Model, batch: Batch, training: bool) -> Any:
        x, y, sample_weight = unpack(batch)
        if y is None:
            raise ValueError(
                f"The loss {loss.name!r} compares predictions with targets, but "
                "the batch has no targets: pass (x, y) or (x, y, sample_weight), "
                "or a full-control loss (model, batch, training) -> (loss, y_pred)."
            )
        y_pred = model(x, training=training)
        return loss(y, y_pred, sample_weight=sample_weight), y_pred

    # Under a strategy, Keras divides mean-like losses by the replica count;
    # for a per-example mean the step instead weighs each replica's share by
    # its number of examples, exact for a ragged last batch too.
    model_loss.replica_scaled = loss.reduction in MEAN_REDUCTIONS  # type: ignore[attr-defined]
    model_loss.per_example_mean = loss.reduction in ("sum_over_batch_size", "mean")  # type: ignore[attr-defined]
    return model_loss
