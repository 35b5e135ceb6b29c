"""Keras `compile` arguments, per output: metrics, weighted metrics, losses, loss weights.

`TrainState.create(metrics=, weighted_metrics=)` and
`make_train_step(loss, loss_weights=)` accept what `model.compile` accepts,
and this module maps them onto a model's outputs as Keras does:

  * a single loss or metric list applies to every output (a multi-output
    model reports each output's loss as ``{output}_loss``);
  * a list has one entry per output, in the model's output order;
  * a dict is keyed by output name (a functional model's output layer
    names, or the keys of its dict of outputs);
  * strings are Keras names (``"accuracy"``, ``"mae"``, ``"mse"``,
    ``"crossentropy"``); ``"accuracy"`` and ``"crossentropy"`` pick the
    binary, sparse or categorical form from the shapes, as Keras does;
  * ``metrics`` ignore sample weights, ``weighted_metrics`` use them;
    metric names are Keras' (``"b_mae"`` for output ``b``, ``"weighted_"``
    for a name already taken by an unweighted metric).

A structure that names no output raises a `ValueError` naming the outputs,
when the state or the step is built, before any variable exists or changes.

`TrainState.create(metrics=, weighted_metrics=)` resolves its metrics here
(`resolve_metrics`), once, into Keras metrics named as Keras names them,
each with the `Route` (output, sample weights or not) the built-in steps
follow.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import keras
import tensorflow as tf

from tfpure.compat import is_functional, metric_function

__all__ = ["Accuracy", "Outputs", "Route", "clone_metric", "resolve_metrics", "select"]


@attrs.frozen
class Outputs:
    """A model's outputs as `compile` sees them.

    Attributes:
      names: the output names in Keras' order, or None for a model with one
        output (or a subclassed model, whose outputs are known only when it runs).
      keyed: the model returns a dict of outputs (keyed by `names`).

    Example:
      >>> import keras
      >>> from tfpure.outputs import Outputs
      >>> x = keras.Input((3,))
      >>> model = keras.Model(x, [keras.layers.Dense(2, name="a")(x),
      ...                         keras.layers.Dense(1, name="b")(x)])
      >>> Outputs.of(model)
      Outputs(names=('a', 'b'), keyed=False)
    """

    names: tuple[str, ...] | None
    keyed: bool = False

    @classmethod
    def of(cls, model: keras.Model) -> Outputs:
        if not is_functional(model):
            return cls(None)
        out = model.output
        if isinstance(out, Mapping):
            # Keras orders a dict of outputs by key (as `keras.tree` flattens it).
            return cls(tuple(sorted(out)) if len(out) > 1 else None, keyed=len(out) > 1)
        if isinstance(out, list | tuple) and len(out) > 1:
            return cls(tuple(model.output_names))
        return cls(None)

    @property
    def several(self) -> bool:
        return self.names is not None

    def describe(self) -> str:
        """The outputs, as error messages name them.

        Example:
          >>> from tfpure.outputs import Outputs
          >>> Outputs(("a", "b")).describe(), Outputs(None).describe()
          ("outputs ['a', 'b']", 'one output')
        """
        return f"outputs {list(self.names)}" if self.names else "one output"


@attrs.frozen
class Route:
    """Which output a metric reads, and whether it takes sample weights.

    Attributes:
      output: the output's name, or None (the whole targets and predictions).
      index: the output's position in the model's output order, or None.
      weighted: the metric receives the batch's sample weights
        (``weighted_metrics``); else it ignores them (``metrics``).

    Example:
      >>> import keras, tfpure as tp
      >>> x = keras.Input((3,))
      >>> model = keras.Model(x, [keras.layers.Dense(2, name="a")(x),
      ...                         keras.layers.Dense(1, name="b")(x)])
      >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD(),
      ...                              weighted_metrics={"b": "mae"})
      >>> state.routes["b_mae"]
      Route(output='b', index=1, weighted=True)
    """

    output: str | None = None
    index: int | None = None
    weighted: bool = False


def select(structure: Any, route: Route) -> Any:
    """The part of targets, predictions or sample weights that `route` reads.

    Example:
      >>> from tfpure.outputs import Route, select
      >>> select({"a": 1, "b": 2}, Route("b", 1)), select([1, 2], Route("b", 1))
      (2, 2)
    """
    if route.output is None or structure is None:
        return structure
    if isinstance(structure, Mapping):
        if route.output not in structure:
            raise ValueError(
                f"The batch has no entry for output {route.output!r}: its targets (or sample "
                f"weights) are keyed {sorted(structure)}. Key them by the model's output names."
            )
        return structure[route.output]
    if isinstance(structure, list | tuple):
        if route.index is None or route.index >= len(structure):
            raise ValueError(
                f"The batch has {len(structure)} targets (or sample weights), but a metric or "
                f"loss reads output {route.output!r} (position {route.index}): give one per "
                "output, in the model's output order, or a dict keyed by output name."
            )
        return structure[route.index]
    return structure  # one sample weight for every output, as Keras


def shape_kind(y_true: Any, y_pred: Any) -> str:
    """Keras' rule for "accuracy" and "crossentropy": binary, sparse or categorical."""
    if y_pred.shape[-1] == 1:
        return "binary"
    if len(y_true.shape) < len(y_pred.shape) or (y_true.shape[-1] == 1 and y_pred.shape[-1] > 1):
        return "sparse"
    return "categorical"


def by_shape(y_true: Any, y_pred: Any, *, binary: Any, sparse: Any, categorical: Any) -> Any:
    """The binary, sparse or categorical choice for these shapes, by Keras' rule.

    Example:
      >>> import numpy as np
      >>> from tfpure.outputs import by_shape
      >>> by_shape(np.zeros(4), np.zeros((4, 3)), binary="b", sparse="s", categorical="c")
      's'
    """
    return {"binary": binary, "sparse": sparse, "categorical": categorical}[
        shape_kind(y_true, y_pred)
    ]


def as_list(entry: Any) -> list[Any]:
    if entry is None:
        return []
    return list(entry) if isinstance(entry, list | tuple) else [entry]


def per_output(
    value: Any, outputs: Outputs, argument: str, *, by_name: bool = False
) -> list[list[Any]] | None:
    """`value` split per output (a list of lists), or None if it applies to the whole y.

    A dict keyed by output names is per output. With `by_name` (metrics), a
    dict none of whose keys is an output name is tfpure's name -> metric
    form (None); a dict mixing output names and other keys is refused.

    Example:
      >>> from tfpure.outputs import Outputs, per_output
      >>> per_output({"b": "mae"}, Outputs(("a", "b")), "metrics")
      [[], ['mae']]
    """
    names = outputs.names
    if isinstance(value, Mapping):
        unknown = [k for k in value if names is None or k not in names]
        if not unknown:
            return [as_list(value.get(n)) for n in names or ()]
        if names is not None and not (by_name and len(unknown) == len(value)):
            raise ValueError(
                f"`{argument}` is keyed {sorted(value)}, but {sorted(unknown)} name no output "
                f"of the model; its {outputs.describe()}. Key it by output name."
            )
        return None
    if names is None or not isinstance(value, list | tuple):
        return None
    if len(value) != len(names):
        raise ValueError(
            f"`{argument}` is a list of {len(value)} entries for a model with "
            f"{outputs.describe()}: give one entry (a metric, a list, or None) per output, "
            "or a dict keyed by output name."
        )
    return [as_list(v) for v in value]


# -- metrics, as compile takes them -------------------------------------------------

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
      >>> from tfpure.outputs import Accuracy
      >>> m = Accuracy(); m.update_state(np.array([1, 0]), np.array([[0.2, 0.8], [0.4, 0.6]]))
      >>> float(m.result())  # sparse labels against 2 classes
      0.5
    """

    def __init__(self, name: str = "accuracy", dtype: Any = None):
        super().__init__(_accuracy, name=name, dtype=dtype)

    def get_config(self) -> dict[str, Any]:
        """Its name and dtype (the function is always the same), for copies.

        Example:
          >>> from tfpure.outputs import Accuracy
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
      >>> from tfpure.outputs import clone_metric
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
      >>> from tfpure.outputs import resolve_metrics
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
