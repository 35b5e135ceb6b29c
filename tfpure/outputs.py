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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import keras

from tfpure.compat import is_functional

__all__ = ["Outputs", "Route", "select"]


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
