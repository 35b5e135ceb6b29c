"""Metrics as `model.compile` takes them: names, functions, lists, dicts per output.

`TrainState.create(metrics=, weighted_metrics=)` resolves them here, once,
into Keras metrics named as Keras names them, each with the `Route` (output,
sample weights or not) the built-in steps follow. See `tfpure.outputs` for
how a structure maps onto a model's outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import tensorflow as tf

from tfpure.compat import metric_function
from tfpure.outputs import Outputs, Route, as_list, by_shape, per_output

__all__ = ["Accuracy", "clone_metric", "resolve_metrics"]

_ACCURACY = ("accuracy", "acc")


def _accuracy(y_true: Any, y_pred: Any) -> tf.Tensor:
    fn = by_shape(
        y_true,
        y_pred,
        binary=keras.metrics.binary_accuracy,
        sparse=keras.metrics.sparse_categorical_accuracy,
        categorical=keras.metrics.categorical_accuracy,
    )
    return fn(y_true, y_pred)


class Accuracy(keras.metrics.MeanMetricWrapper):
    """``"accuracy"`` as `compile` resolves it: binary, sparse or categorical by shapes.

    Keras picks the form when it first sees data; this metric owns its
    variables from the start (so a state can be restored before any step)
    and picks the form when the step is traced, by the same rule.

    Example:
      >>> import numpy as np
      >>> from tfpure.metrics import Accuracy
      >>> m = Accuracy(); m.update_state(np.array([1, 0]), np.array([[0.2, 0.8], [0.4, 0.6]]))
      >>> float(m.result())  # sparse labels against 2 classes
      0.5
    """

    def __init__(self, name: str = "accuracy", dtype: Any = None):
        super().__init__(_accuracy, name=name, dtype=dtype)

    def get_config(self) -> dict[str, Any]:
        """Its name and dtype (the function is always the same), for copies.

        Example:
          >>> from tfpure.metrics import Accuracy
          >>> Accuracy.from_config(Accuracy(name="acc").get_config()).name
          'acc'
        """
        return {"name": self.name, "dtype": self.dtype}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Accuracy:
        return cls(**config)


def _metric(identifier: Any, argument: str) -> keras.metrics.Metric:
    """One metric of a `compile`-style argument, named as Keras names it."""
    if isinstance(identifier, keras.metrics.Metric):
        return identifier
    if isinstance(identifier, str) and identifier.lower() in _ACCURACY:
        return Accuracy(name=identifier)
    try:
        found = keras.metrics.get(identifier)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"`{argument}` has {identifier!r}, which is not a Keras metric: give a "
            "keras.metrics.Metric, a metric name such as 'accuracy' or 'mae', or a function "
            f"(y_true, y_pred) -> values. ({err})"
        ) from None
    name = identifier if isinstance(identifier, str) else getattr(found, "__name__", None)
    if isinstance(found, keras.metrics.Metric):
        if isinstance(identifier, str):
            found.name = identifier
        return found
    if not callable(found):
        raise ValueError(f"`{argument}` has {identifier!r}, which is not a metric.")
    return keras.metrics.MeanMetricWrapper(found, name=name or "metric")


def clone_metric(metric: keras.metrics.Metric) -> keras.metrics.Metric:
    """A fresh metric like `metric` (from its config; a wrapped function is wrapped again).

    Example:
      >>> import keras
      >>> from tfpure.metrics import clone_metric
      >>> m = keras.metrics.MeanMetricWrapper(lambda t, p: abs(t - p), name="gap")
      >>> copy = clone_metric(m)
      >>> copy is not m and copy.name
      'gap'
    """
    if type(metric) is keras.metrics.MeanMetricWrapper:  # a lambda has no config
        fn, kwargs = metric_function(metric)
        return keras.metrics.MeanMetricWrapper(fn, name=metric.name, dtype=metric.dtype, **kwargs)
    return type(metric).from_config(metric.get_config())


def resolve_metrics(
    model: keras.Model, metrics: Any, weighted_metrics: Any
) -> tuple[dict[str, keras.metrics.Metric], dict[str, Route]]:
    """Metrics by their Keras names, and the route each reads by, from `compile`-style args.

    A dict of name -> metric whose keys are not output names keeps its
    keys as names and reads the whole targets (tfpure's own form).

    Returns:
      ``(metrics, routes)``: dicts by name, in Keras' order (unweighted first).

    Raises:
      TypeError: a metric is of the wrong type.
      ValueError: a name clashes, is ``"loss"``, or a structure names no output.

    Example:
      >>> import keras
      >>> from tfpure.metrics import resolve_metrics
      >>> x = keras.Input((3,))
      >>> model = keras.Model(x, {"a": keras.layers.Dense(2)(x), "b": keras.layers.Dense(1)(x)})
      >>> metrics, routes = resolve_metrics(model, {"a": "accuracy"}, {"b": ["mae"]})
      >>> list(metrics), routes["b_mae"].weighted
      (['a_accuracy', 'b_mae'], True)
    """
    outputs = Outputs.of(model)
    taken: dict[str, int] = {}
    found: dict[str, keras.metrics.Metric] = {}
    routes: dict[str, Route] = {}

    def add(name: str, metric: keras.metrics.Metric, route: Route, argument: str) -> None:
        if name == "loss":
            raise ValueError(
                f"`{argument}` may not use the name 'loss': tfpure adds its own loss tracker "
                "under that name. Rename the metric."
            )
        if name in found:
            raise ValueError(f"`{argument}` names two metrics {name!r}.")
        found[name], routes[name] = metric, route

    for argument, value in (("metrics", metrics), ("weighted_metrics", weighted_metrics)):
        weighted = argument == "weighted_metrics"
        if value is None:
            continue
        if isinstance(value, keras.metrics.Metric | str) or callable(value):
            value = [value]
        if not isinstance(value, Mapping | list | tuple):
            raise TypeError(
                f"`{argument}` must be a list of metrics, a dict by output name or by metric "
                f"name, or None; got {type(value).__name__}."
            )
        split = per_output(value, outputs, argument, by_name=True)
        if split is None and isinstance(value, Mapping):  # name -> metric (tfpure's form)
            for name, entry in value.items():
                if not isinstance(name, str) or not name:
                    raise ValueError(f"`{argument}` has a metric without a name: {entry!r}.")
                metric = _metric(entry, f"{argument}[{name!r}]")
                add(name, metric, Route(weighted=weighted), argument)
            continue
        groups = (
            [(None, None, as_list(value))]
            if split is None
            else [
                (n, i, entries)
                for i, (n, entries) in enumerate(zip(outputs.names, split, strict=True))
            ]
        )
        for output, index, entries in groups:
            for entry in entries:
                metric = _metric(entry, argument)
                name = metric.name if output is None else f"{output}_{metric.name}"
                if name in taken:  # Keras' names for a repeated metric
                    if weighted and not routes[name].weighted:
                        base = f"weighted_{metric.name}"
                        name = base if output is None else f"{output}_{base}"
                    if name in taken:
                        taken[name] += 1
                        name = f"{name}_{taken[name] - 1}"
                taken.setdefault(name, 1)
                add(name, metric, Route(output, index, weighted), argument)
    return found, routes
