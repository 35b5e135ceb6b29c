"""Every private TensorFlow / Keras API tfpure uses, in one place.

tfpure prefers public APIs; where none does the job, it goes through the
functions here, each of which fails *loudly* (`PrivateAPIChanged`) if the
private API is gone, rather than silently skipping a check or a reseed.
`tests/test_compat.py` checks each of them against the installed versions,
so a TensorFlow or Keras upgrade that changes one turns the suite red.

=================================================  ==================================
Private API                                        What for
=================================================  ==================================
``keras.src.losses.LossFunctionWrapper``           wrap a plain ``(y_true, y_pred)``
                                                   loss exactly as ``compile`` does
``Optimizer._trainable_variables``                 refuse an optimizer built for
                                                   another model
``MeanMetricWrapper._fn``, ``._fn_kwargs``          copy a metric that wraps a lambda
                                                   (it has no config)
``Layer._flatten_layers``                          every layer of a model, nested
``Layer._seed_generators``                         reseed Dropout & co. from
                                                   ``TrainState.create(seed=)``
``Model._inputs_struct``                           a functional model's input
                                                   structure (dict inputs)
``ConcreteFunction._call_flat``                    call an epoch's concrete function
                                                   with flat tensors (speed only)
``Dataset._as_serialized_graph``                   refuse data a resume cannot replay
``tf.__internal__.distribute.``                    pick the guard's branch per replica
``strategy_supports_no_merge_call``                or in cross-replica context
=================================================  ==================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

__all__ = [
    "LossFunctionWrapper",
    "PrivateAPIChanged",
    "flat_caller",
    "flatten_layers",
    "is_functional",
    "metric_function",
    "model_input_structure",
    "optimizer_built_for",
    "seed_generators",
    "serialized_dataset_graph",
    "supports_no_merge_call",
]


class PrivateAPIChanged(RuntimeError):
    """A private TensorFlow / Keras API tfpure relies on is gone or changed.

    Example:
      >>> from tfpure.compat import PrivateAPIChanged, _require
      >>> try:
      ...     _require(object(), "_no_such_thing", "an example")
      ... except PrivateAPIChanged as err:
      ...     print(str(err).split(":")[0])
      tfpure needs object._no_such_thing (an example)
    """


def _require(obj: Any, name: str, purpose: str) -> Any:
    try:
        return getattr(obj, name)
    except AttributeError:
        raise PrivateAPIChanged(
            f"tfpure needs {type(obj).__name__}.{name} ({purpose}): this version of "
            f"TensorFlow {tf.__version__} / Keras {keras.__version__} does not have it. "
            "Install a version in tfpure's tested range (see its README)."
        ) from None


try:
    from keras.src.losses import LossFunctionWrapper
except ImportError as err:  # pragma: no cover - only on an untested Keras
    raise PrivateAPIChanged(
        f"tfpure needs keras.src.losses.LossFunctionWrapper (Keras {keras.__version__}): {err}"
    ) from err


def optimizer_built_for(optimizer: keras.optimizers.Optimizer) -> list[Any]:
    """The variables a built optimizer was built for (empty if it is not built).

    Example:
      >>> import keras
      >>> from tfpure.compat import optimizer_built_for
      >>> layer = keras.layers.Dense(1, name="head"); layer.build((None, 2))
      >>> opt = keras.optimizers.SGD(); opt.build(layer.trainable_variables)
      >>> [v.path for v in optimizer_built_for(opt)]
      ['head/kernel', 'head/bias']
    """
    if not optimizer.built:
        return []
    return list(_require(optimizer, "_trainable_variables", "which variables it was built for"))


def metric_function(metric: keras.metrics.MeanMetricWrapper) -> tuple[Any, dict[str, Any]]:
    """The function a `MeanMetricWrapper` averages, and the keyword arguments it passes.

    Example:
      >>> import keras
      >>> from tfpure.compat import metric_function
      >>> fn = lambda t, p: abs(t - p)
      >>> metric_function(keras.metrics.MeanMetricWrapper(fn, name="gap"))[0] is fn
      True
    """
    fn = _require(metric, "_fn", "copy a metric that wraps a function")
    return fn, dict(_require(metric, "_fn_kwargs", "copy a metric that wraps a function"))


def flatten_layers(model: keras.layers.Layer, *, include_self: bool = True) -> list[Any]:
    """Every layer in `model`, nested ones included.

    Example:
      >>> import keras
      >>> from tfpure.compat import flatten_layers
      >>> inner = keras.Sequential([keras.layers.Dense(1, name="d")], name="inner")
      >>> model = keras.Sequential([keras.Input((2,)), inner], name="outer")
      >>> [layer.name for layer in flatten_layers(model) if "input" not in layer.name]
      ['outer', 'inner', 'd']
    """
    flatten = _require(model, "_flatten_layers", "every nested layer")
    return list(flatten(include_self=include_self, recursive=True))


def seed_generators(model: keras.layers.Layer) -> list[keras.random.SeedGenerator]:
    """The `SeedGenerator`s of every layer in `model` (Dropout's masks, ...).

    Example:
      >>> import keras
      >>> from tfpure.compat import seed_generators
      >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dropout(0.5)])
      >>> len(seed_generators(model))
      1
    """
    generators = []
    for layer in flatten_layers(model):
        generators.extend(_require(layer, "_seed_generators", "its random seed generators"))
    return generators


def is_functional(model: keras.Model) -> bool:
    """Whether `model` is a functional model (Keras' private `Functional` class).

    Example:
      >>> import keras
      >>> from tfpure.compat import is_functional
      >>> x = keras.Input((2,))
      >>> is_functional(keras.Model(x, keras.layers.Dense(1)(x))), is_functional(keras.Model())
      (True, False)
    """
    return any(cls.__name__ == "Functional" for cls in type(model).__mro__)


def model_input_structure(model: keras.Model) -> Any:
    """The structure of a model's declared inputs (None for a subclassed model).

    Example:
      >>> import keras
      >>> from tfpure.compat import model_input_structure
      >>> a, b = keras.Input((2,), name="a"), keras.Input((3,), name="b")
      >>> model = keras.Model({"a": a, "b": b}, keras.layers.Concatenate()([a, b]))
      >>> sorted(model_input_structure(model))
      ['a', 'b']
    """
    if is_functional(model):
        return _require(model, "_inputs_struct", "the model's input structure")
    try:
        return model.inputs  # Sequential models declare a list.
    except (AttributeError, ValueError):
        return None  # A subclassed model: its own layers check their inputs.


def flat_caller(concrete: Any, iterator: Any) -> Callable[[tf.Tensor], Any]:
    """Calls `concrete(iterator, limit)` with the iterator's flat tensors, for speed.

    Falls back to the public call if `_call_flat` is gone: only slower.
    """
    call_flat = getattr(concrete, "_call_flat", None)
    if call_flat is None:
        return lambda limit: concrete(iterator, limit)
    inputs = tf.nest.flatten(iterator, expand_composites=True)
    captured = concrete.captured_inputs
    return lambda limit: call_flat([*inputs, limit], captured)


def serialized_dataset_graph(data: tf.data.Dataset) -> tf.Tensor:
    """The dataset's graph, serialized; raises `tf.errors.OpError` on external state.

    Example:
      >>> import tensorflow as tf
      >>> from tfpure.compat import serialized_dataset_graph
      >>> graph = serialized_dataset_graph(tf.data.Dataset.range(3))
      >>> graph.dtype
      tf.string
    """
    serialize = _require(data, "_as_serialized_graph", "checking that a resume can replay it")
    return serialize(external_state_policy=tf.data.experimental.ExternalStatePolicy.FAIL)


def supports_no_merge_call() -> bool:
    """Whether the current strategy all-reduces gradients without `merge_call`.

    Example:
      >>> from tfpure.compat import supports_no_merge_call
      >>> supports_no_merge_call()  # the default strategy
      True
    """
    internal = _require(tf, "__internal__", "distribution internals")
    distribute = _require(internal, "distribute", "distribution internals")
    check = _require(distribute, "strategy_supports_no_merge_call", "the guard under strategies")
    return bool(check())
