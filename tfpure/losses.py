"""Losses as `model.compile` takes them, for the built-in steps: per output, with weights.

`make_train_step(loss, loss_weights=)` and `make_eval_step` keep an
`OutputLoss`; each step binds it to the model it meets (`BoundLoss`), which
scores a batch and tracks each output's loss as Keras reports it
(``{output}_loss``, when there are several). See `tfpure.outputs` for how a
structure maps onto a model's outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import tensorflow as tf

from tfpure.batch import (
    MEAN_REDUCTIONS,
    Batch,
    as_model_loss,
    required_positional,
    targets_loss,
    unpack,
)
from tfpure.compat import LossFunctionWrapper
from tfpure.outputs import Outputs, Route, by_shape, per_output, select

__all__ = ["BoundLoss", "OutputLoss", "bind", "step_loss"]

_CROSSENTROPY = ("crossentropy", "ce")


def _loss(identifier: Any, argument: str) -> Any:
    """A loss of a `compile`-style argument: a Keras Loss, or "crossentropy" (by shapes)."""
    if identifier is None:
        return None
    if isinstance(identifier, str) and identifier.lower() in _CROSSENTROPY:
        return identifier  # resolved from the shapes when the step is traced
    if isinstance(identifier, keras.losses.Loss):
        return identifier
    if isinstance(identifier, str):
        try:
            fn = keras.losses.get(identifier)
        except (ValueError, TypeError):
            fn = None
        if fn is None:
            raise ValueError(
                f"`{argument}` has {identifier!r}, which is not a Keras loss name (such as "
                "'mse', 'mae', 'sparse_categorical_crossentropy' or 'crossentropy')."
            )
        return fn if isinstance(fn, keras.losses.Loss) else LossFunctionWrapper(fn, name=identifier)
    if callable(identifier):
        return LossFunctionWrapper(identifier, name=getattr(identifier, "__name__", "loss"))
    raise TypeError(
        f"`{argument}` has {identifier!r}: expected a keras.losses.Loss, a loss name or a "
        "function (y_true, y_pred) -> loss."
    )


def _crossentropy(y_true: Any, y_pred: Any) -> keras.losses.Loss:
    fn = by_shape(
        y_true,
        y_pred,
        binary=keras.losses.binary_crossentropy,
        sparse=keras.losses.sparse_categorical_crossentropy,
        categorical=keras.losses.categorical_crossentropy,
    )
    return LossFunctionWrapper(fn, name=fn.__name__)


def _weights(loss_weights: Any, outputs: Outputs, count: int) -> list[float | None]:
    if loss_weights is None:
        return [None] * count
    if isinstance(loss_weights, int | float) and not isinstance(loss_weights, bool):
        if outputs.several:
            raise ValueError(
                f"`loss_weights` is one number for a model with {outputs.describe()}: give "
                "one weight per output (a list, or a dict keyed by output name)."
            )
        return [float(loss_weights)]
    split = per_output(loss_weights, outputs, "loss_weights")
    if split is None:
        if isinstance(loss_weights, Mapping) and len(loss_weights) == 1 and not outputs.several:
            return [float(next(iter(loss_weights.values())))]
        raise ValueError(
            f"`loss_weights` must be a number (one output), a list with one weight per "
            f"output, or a dict keyed by output name; the model has {outputs.describe()}."
        )
    return [None if not w else float(w[0]) for w in split]


class OutputLoss:
    """A loss as `compile` takes it (per output, with weights), for the built-in steps.

    `make_train_step` and `make_eval_step` build one from their `loss` and
    `loss_weights`; each step `bind`s it to the model it meets. One output
    without weights is scored exactly as a single loss is.

    Example:
      >>> import keras
      >>> from tfpure.losses import OutputLoss
      >>> x = keras.Input((3,))
      >>> model = keras.Model(x, {"a": keras.layers.Dense(2)(x), "b": keras.layers.Dense(1)(x)})
      >>> list(OutputLoss({"a": "mse", "b": "mae"}, {"a": 1.0, "b": 0.5}).bind(model).trackers)
      ['a_loss', 'b_loss']
    """

    def __init__(self, loss: Any, loss_weights: Any = None):
        self.loss_weights = loss_weights
        if isinstance(loss, Mapping):
            self.losses: Any = {k: _loss(v, f"loss[{k!r}]") for k, v in loss.items()}
        elif isinstance(loss, list | tuple):
            self.losses = [_loss(v, f"loss[{i}]") for i, v in enumerate(loss)]
        else:
            self.losses = _loss(loss, "loss")
        if loss_weights is not None and not isinstance(
            loss_weights, int | float | Mapping | list | tuple
        ):
            raise TypeError(
                "`loss_weights` must be a number, a list or a dict by output name; got "
                f"{type(loss_weights).__name__}."
            )

    def bind(self, model: keras.Model) -> BoundLoss:
        """The loss for `model`'s outputs, with a tracker per output if there are several.

        Raises:
          ValueError: the loss or its weights name no output of `model`.
        """
        outputs = Outputs.of(model)
        if isinstance(self.losses, Mapping | list | tuple):
            split = per_output(self.losses, outputs, "loss")
            if split is None:
                if isinstance(self.losses, Mapping) and len(self.losses) == 1:
                    split = [list(self.losses.values())]  # one output, keyed by its name
                else:
                    raise ValueError(
                        f"`loss` is a {type(self.losses).__name__} of {len(self.losses)} "
                        f"entries, but the model has {outputs.describe()}: give one loss per "
                        "output, keyed by output name or in output order."
                    )
            losses = [entries[0] if entries else None for entries in split]
        else:
            losses = [self.losses] * (len(outputs.names) if outputs.several else 1)
        weights = _weights(self.loss_weights, outputs, len(losses))
        return BoundLoss(outputs, losses, weights)


class BoundLoss:
    """An `OutputLoss` bound to one model: scores a batch, tracks each output's loss."""

    def __init__(self, outputs: Outputs, losses: list[Any], weights: list[float | None]):
        self.outputs = outputs
        names = outputs.names or (None,)
        self.terms = [
            (Route(n, i) if outputs.several else Route(), loss, w)
            for i, (n, loss, w) in enumerate(zip(names, losses, weights, strict=True))
            if loss is not None
        ]
        if not self.terms:
            raise ValueError("`loss` gives no loss for any output (every entry is None).")
        # Keras reports each output's loss when there are several.
        self.trackers = {
            f"{route.output}_loss": keras.metrics.Mean(name=f"{route.output}_loss")
            for route, _, _ in self.terms
            if len(self.terms) > 1
        }
        reductions = [
            getattr(loss, "reduction", "sum_over_batch_size") for _, loss, _ in self.terms
        ]
        self.replica_scaled = all(r in MEAN_REDUCTIONS for r in reductions)
        self.per_example_mean = all(r in ("sum_over_batch_size", "mean") for r in reductions)
        self.single = (
            None
            if outputs.several or weights[0] is not None or isinstance(losses[0], str)
            else targets_loss(losses[0])
        )

    def __call__(self, model: keras.Model, batch: Batch, training: bool) -> tuple[Any, Any]:
        total, y_pred, _ = self.split(model, batch, training)
        return total, y_pred

    def split(self, model: keras.Model, batch: Batch, training: bool) -> tuple[Any, Any, list]:
        """``(total loss, y_pred, [each output's unweighted loss])``."""
        if self.single is not None:
            total, y_pred = self.single(model, batch, training)
            return total, y_pred, [total]
        x, y, sample_weight = unpack(batch)
        if y is None:
            raise ValueError(
                "The loss compares predictions with targets, but the batch has no targets: "
                "pass (x, y) or (x, y, sample_weight)."
            )
        y_pred = model(x, training=training)
        if self.outputs.several and not isinstance(y_pred, Mapping | list | tuple):
            raise ValueError(
                f"The model returned one tensor; the loss expects {self.outputs.describe()}."
            )
        values, total = [], None
        for route, loss, weight in self.terms:
            y_t, y_p = select(y, route), select(y_pred, route)
            if isinstance(loss, str):
                loss = _crossentropy(y_t, y_p)
            value = tf.cast(loss(y_t, y_p, sample_weight=select(sample_weight, route)), tf.float32)
            values.append(value)
            if weight is not None:
                value = value * weight
            total = value if total is None else total + value
        return total, y_pred, values

    def track(self, values: list[Any], y_pred: Any) -> list[Any]:
        """Updates each output's loss tracker with its unweighted loss, as Keras does.

        Keras weighs a batch by its static size, so a batch of unknown size
        (a dataset's ragged last batch) counts once. Under a strategy, a
        global batch of unknown size counts once too, however it splits:
        each replica's share of it weighs its replica's mean.
        """
        if not self.trackers:
            return []
        context = tf.distribute.get_replica_context()
        replicas = context.num_replicas_in_sync if context is not None else 1
        ops, share = [], None
        for (route, _, _), value, tracker in zip(
            self.terms, values, self.trackers.values(), strict=True
        ):
            first = tf.nest.flatten(select(y_pred, route))[0]
            weight = first.shape[0]
            if weight is None and replicas > 1:
                if share is None:
                    n = tf.cast(tf.shape(first)[0], tf.float32)
                    share = n / context.all_reduce("sum", n)
                weight = share
            ops.append(tracker.update_state(value * replicas, sample_weight=weight))
        return ops


def bind(model_loss: Any, model: keras.Model) -> Any:
    """A built-in step's loss for `model`: an `OutputLoss` bound to it, else as it is."""
    return model_loss.bind(model) if isinstance(model_loss, OutputLoss) else model_loss


def step_loss(loss: Any, loss_weights: Any) -> Any:
    """The model loss a built-in step keeps: full-control callables as they are, else an
    `OutputLoss` (scored per output when the model has several)."""
    full_control = (
        callable(loss)
        and not isinstance(loss, keras.losses.Loss | str)
        and required_positional(loss) == 3
    )
    if full_control:
        if loss_weights is not None:
            raise ValueError(
                "`loss_weights` weigh the outputs of a compile-style loss; a full-control "
                "loss (model, batch, training) weighs its own terms. Drop `loss_weights`."
            )
        return as_model_loss(loss)
    if not isinstance(loss, Mapping | list | tuple | str):
        as_model_loss(loss)  # the same checks (and errors) as for one loss
    return OutputLoss(loss, loss_weights)
