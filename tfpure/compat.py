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
``keras.src.backend.tensorflow.random``            draw Keras' random ops (Dropout & co.)
                                                   with threefry inside XLA steps
``Layer._flatten_layers``                          every layer of a model, nested
``Layer._seed_generators``                         reseed Dropout & co. from
                                                   ``TrainState.create(seed=)``
``Model._inputs_struct``                           a functional model's input
                                                   structure (dict inputs)
``ConcreteFunction._call_flat``                    call an epoch's concrete function
                                                   with flat tensors (speed only)
``Operation._set_attr``, the ``If`` op's           keep the guard's per-step branches
``_lower_using_switch_merge`` attribute            functional (speed only)
``_BatchDataset._input_dataset``, ``._batch_size``, feed the batches of
``._drop_remainder``; ``_TensorSliceDataset.``      ``from_tensor_slices(arrays)``
``_tensors``; ``_PrefetchDataset._input_dataset``   ``.batch(n)`` to an XLA step's calls
``_RepeatDataset._input_dataset``, ``._count``      as views of the arrays, repeated
                                                   too (speed only)
``Dataset._as_serialized_graph``                   refuse data a resume cannot replay
a dataset op's inputs, by name (`tf.raw_ops`)      read its seeds and batch size; an
                                                   op read otherwise is not replayable
``tf.__internal__.distribute.``                    pick the guard's branch per replica
``strategy_supports_no_merge_call``                or in cross-replica context
``tf.__internal__.CompositeTensor``                tell ragged / sparse batch leaves
                                                   from dense ones (trace signatures)
a checkpoint's key for an object's value           read the saved layout before a
(``NAME/.ATTRIBUTES/VARIABLE_VALUE``)              restore changes anything
``Loss.__call__``, ``Loss._dtype``                 compute Keras losses in float64
                                                   (``tfpure.testing`` finite differences)
=================================================  ==================================
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Callable, Iterator
from typing import Any

import keras
import tensorflow as tf

__all__ = [
    "LossFunctionWrapper",
    "PrivateAPIChanged",
    "branch",
    "checkpoint_value_key",
    "dataset_op_inputs",
    "endless_source",
    "flat_caller",
    "flatten_layers",
    "is_composite",
    "is_functional",
    "keras_losses_in_float64",
    "keras_random_algorithm",
    "metric_function",
    "model_input_structure",
    "optimizer_built_for",
    "seed_generators",
    "serialized_dataset_graph",
    "sliced_arrays",
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


_RANDOM_LOCK = threading.RLock()


@contextlib.contextmanager
def keras_random_algorithm(alg: str) -> Iterator[None]:
    """Keras' random ops draw with TensorFlow's stateless algorithm `alg` inside the block.

    Keras' TensorFlow backend draws Dropout's masks (and `keras.random.*`)
    with ``alg="auto_select"``, which XLA on CPU compiles to a slow
    generator. tfpure traces its XLA step bodies inside this block with
    ``"threefry"``; the draws stay functions of the same seeds, so a run
    is reproducible and resumes exactly.

    TensorFlow has no plain-graph CPU kernel for threefry: use the block
    only where XLA compiles what is traced in it.

    Example:
      >>> import keras, tensorflow as tf
      >>> from tfpure.compat import keras_random_algorithm
      >>> seed = keras.random.SeedGenerator(1)
      >>> @tf.function(jit_compile=True)
      ... def masked(x):
      ...     with keras_random_algorithm("threefry"):
      ...         return keras.random.dropout(x, 0.5, seed=seed)
      >>> masked(tf.ones((2, 4))).shape
      TensorShape([2, 4])
    """
    import keras.src.backend.tensorflow.random as module

    cast = _require(module, "_cast_seed", "draw Keras' random ops with another algorithm")
    draw = _require(module, "draw_seed", "draw Keras' random ops with another algorithm")
    noise = _require(module, "_get_concrete_noise_shape", "draw Dropout's masks")

    def floats(dtype: Any) -> Any:
        return dtype or keras.config.floatx()

    def uniform(shape, minval=0.0, maxval=1.0, dtype=None, seed=None):  # type: ignore[no-untyped-def]
        dtype = floats(dtype)
        return tf.random.stateless_uniform(
            shape, cast(draw(seed)), tf.cast(minval, dtype), tf.cast(maxval, dtype), dtype, alg=alg
        )

    def normal(shape, mean=0.0, stddev=1.0, dtype=None, seed=None):  # type: ignore[no-untyped-def]
        return tf.random.stateless_normal(
            shape, cast(draw(seed)), mean, stddev, floats(dtype), alg=alg
        )

    def truncated_normal(shape, mean=0.0, stddev=1.0, dtype=None, seed=None):  # type: ignore[no-untyped-def]
        return tf.random.stateless_truncated_normal(
            shape, cast(draw(seed)), mean, stddev, floats(dtype), alg=alg
        )

    def dropout(inputs, rate, noise_shape=None, seed=None):  # type: ignore[no-untyped-def]
        if rate == 1.0:
            return tf.zeros_like(inputs)
        if rate == 0.0:
            return inputs
        return tf.nn.experimental.stateless_dropout(
            inputs,
            rate=rate,
            seed=cast(draw(seed)),
            rng_alg=alg,
            noise_shape=noise(inputs, noise_shape),
        )

    mine = {"uniform": uniform, "normal": normal, "truncated_normal": truncated_normal,
            "dropout": dropout}  # fmt: skip
    with _RANDOM_LOCK:
        theirs = {name: _require(module, name, "draw Keras' random ops") for name in mine}
        for name, fn in theirs.items():
            _same_parameters(fn, mine[name], f"keras.src.backend.tensorflow.random.{name}")
        for name, fn in mine.items():
            setattr(module, name, fn)
        try:
            yield
        finally:
            for name, fn in theirs.items():
                setattr(module, name, fn)


def _same_parameters(theirs: Any, mine: Any, what: str) -> None:
    """Raises `PrivateAPIChanged` unless `mine` takes the parameters `theirs` takes (a
    replacement called as the original is called)."""
    try:
        names = list(inspect.signature(theirs).parameters)
    except (TypeError, ValueError):
        names = None
    wanted = list(inspect.signature(mine).parameters)
    if names != wanted:
        raise PrivateAPIChanged(
            f"tfpure replaces {what} with a function taking {wanted}; this version of "
            f"TensorFlow {tf.__version__} / Keras {keras.__version__} takes {names}. "
            "Install a version in tfpure's tested range (see its README)."
        )


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


def flat_caller(concrete: Any, *fixed: Any) -> Callable[..., Any]:
    """Calls ``concrete(*fixed, *rest)`` with `fixed`'s flat tensors found once, for speed.

    The loops call one concrete function many times with the same iterator
    (`fixed`) and a new ``limit`` (`rest`, plain tensors), or with no
    argument at all; a `tf.function` call would hash every argument's type
    each time. Falls back to the public call if `_call_flat` is gone: only
    slower.
    """
    call_flat = getattr(concrete, "_call_flat", None)
    if call_flat is None:
        return lambda *rest: concrete(*fixed, *rest)
    inputs = tf.nest.flatten(fixed, expand_composites=True)
    captured = concrete.captured_inputs
    return lambda *rest: call_flat([*inputs, *rest], captured)


def branch(
    pred: tf.Tensor, true_fn: Callable[[], Any], false_fn: Callable[[], Any], functional: bool
) -> Any:
    """``tf.cond(pred, true_fn, false_fn)``, its ``If`` op kept `functional`: for speed.

    In a `tf.function`, TensorFlow lowers an ``If`` op to a ``Switch`` per
    captured tensor, each run on every call whichever branch is taken. A
    guarded step's branches (put a step back, record a failure) capture every
    variable it writes and are rarely taken: kept functional, the op calls
    the taken branch with its inputs instead (3% of a guarded step at one
    step a call on the tutorial MLP, `benchmarks/ab_loop.py`). Not
    `functional` under a strategy: a functional ``If`` cannot place the
    variables of several devices. Falls back to the lowered op if `_set_attr`
    is gone: only slower.

    Example:
      >>> import tensorflow as tf
      >>> from tfpure.compat import branch
      >>> f = tf.function(lambda x: branch(x > 0, lambda: x, lambda: -x, functional=True))
      >>> float(f(tf.constant(-2.0)))
      2.0
      >>> graph = f.get_concrete_function(tf.TensorSpec([])).graph
      >>> [op.get_attr("_lower_using_switch_merge") for op in graph.get_operations()
      ...  if op.type in ("If", "StatelessIf")]
      [False]
    """
    out = tf.cond(pred, true_fn, false_fn)
    if not functional or tf.executing_eagerly():
        return out
    op = tf.nest.flatten(out)[0].op
    while op.type == "Identity":
        op = op.inputs[0].op
    set_attr = getattr(op, "_set_attr", None)
    if op.type in ("If", "StatelessIf") and set_attr is not None:
        from tensorflow.core.framework import attr_value_pb2

        set_attr("_lower_using_switch_merge", attr_value_pb2.AttrValue(b=False))
    return out


def endless_source(data: tf.data.Dataset) -> tf.data.Dataset | None:
    """The dataset `data` repeats endlessly (``source.repeat()``); None for other data, or
    if tf.data's classes changed (then grouping its batches is only slower).

    Example:
      >>> import tensorflow as tf
      >>> from tfpure.compat import endless_source
      >>> source = tf.data.Dataset.range(3)
      >>> endless_source(source.repeat()) is source
      True
      >>> print(endless_source(source.repeat(2)), endless_source(source))
      None None
    """
    if type(data).__name__ != "_RepeatDataset":
        return None
    if tf.get_static_value(getattr(data, "_count", None)) != -1:
        return None
    source = getattr(data, "_input_dataset", None)
    return source if isinstance(source, tf.data.Dataset) else None


def sliced_arrays(data: tf.data.Dataset) -> tuple[Any, int] | None:
    """`data` seen as ``Dataset.from_tensor_slices(arrays).batch(size)``, keeping its
    remainder, maybe then prefetched (the tutorials' pipeline): ``(arrays, size)``, the
    arrays the very tensors `data` slices; None for any other data, or if tf.data's
    classes changed (then grouping its batches is only slower).

    Example:
      >>> import numpy as np, tensorflow as tf
      >>> from tfpure.compat import sliced_arrays
      >>> x, y = np.zeros((10, 3), "float32"), np.arange(10)
      >>> data = tf.data.Dataset.from_tensor_slices((x, y)).batch(4).prefetch(2)
      >>> (xs, ys), size = sliced_arrays(data)
      >>> xs.shape, ys.numpy().tolist() == list(range(10)), size
      (TensorShape([10, 3]), True, 4)
      >>> print(sliced_arrays(data.unbatch().batch(4)))
      None
    """
    if type(data).__name__ == "_PrefetchDataset":
        data = getattr(data, "_input_dataset", None)
    if type(data).__name__ != "_BatchDataset":
        return None
    source = getattr(data, "_input_dataset", None)
    size = tf.get_static_value(getattr(data, "_batch_size", None))
    keep = tf.get_static_value(getattr(data, "_drop_remainder", None))
    if type(source).__name__ != "_TensorSliceDataset" or size is None or keep is None or keep:
        return None
    specs = tf.nest.flatten(source.element_spec)
    tensors = list(getattr(source, "_tensors", None) or [])
    if len(tensors) != len(specs) or not all(
        isinstance(s, tf.TensorSpec) and hasattr(t, "numpy") and t.shape[1:] == s.shape
        for t, s in zip(tensors, specs, strict=True)
    ):
        return None  # (composite leaves, or tensors of a graph: not arrays in memory)
    return tf.nest.pack_sequence_as(source.element_spec, tensors), int(size)


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


def dataset_op_inputs(node: Any) -> dict[str, str] | None:
    """The inputs of a dataset op in a serialized dataset graph, by the op's argument names.

    The names and their order come from the op's own wrapper in `tf.raw_ops`
    (its parameters that are neither attributes of the node nor ``name``).
    None if the op has no such wrapper or the node's inputs do not match its
    arguments one for one: a caller must then treat the op as unknown.

    Example:
      >>> import tensorflow as tf
      >>> from tfpure.compat import dataset_op_inputs
      >>> node = tf.compat.v1.NodeDef(op="BatchDatasetV2", input=["d", "size", "drop"])
      >>> for attr in ("output_types", "output_shapes", "parallel_copy", "metadata"):
      ...     _ = node.attr[attr]
      >>> dataset_op_inputs(node)
      {'input_dataset': 'd', 'batch_size': 'size', 'drop_remainder': 'drop'}
    """
    wrapper = getattr(tf.raw_ops, node.op, None)
    if wrapper is None:
        return None
    names = [p for p in inspect.signature(wrapper).parameters if p != "name" and p not in node.attr]
    inputs = [i for i in node.input if not i.startswith("^")]
    if len(names) != len(inputs):
        return None
    return dict(zip(names, inputs, strict=True))


def is_composite(value: Any) -> bool:
    """Whether `value` is a composite tensor (ragged, sparse, ...), not a dense one.

    Example:
      >>> import tensorflow as tf
      >>> from tfpure.compat import is_composite
      >>> is_composite(tf.ragged.constant([[1], [2, 3]])), is_composite(tf.ones(2))
      (True, False)
    """
    internal = _require(tf, "__internal__", "composite tensors")
    return isinstance(value, _require(internal, "CompositeTensor", "ragged and sparse batches"))


def checkpoint_value_key(name: str) -> str:
    """The key under which `tf.train.Checkpoint(name=variable)` saves the variable's value.

    Example:
      >>> from tfpure.compat import checkpoint_value_key
      >>> checkpoint_value_key("layout")
      'layout/.ATTRIBUTES/VARIABLE_VALUE'
    """
    return f"{name}/.ATTRIBUTES/VARIABLE_VALUE"


@contextlib.contextmanager
def keras_losses_in_float64() -> Iterator[None]:
    """Every `keras.losses.Loss` computes in float64 while the context lasts.

    A loss object fixes its dtype (float32) when made; a full-control loss
    calling one would round a float64 model's predictions to float32, and
    finite differences of a float32 loss are noise.

    Example:
      >>> import keras, tensorflow as tf
      >>> from tfpure.compat import keras_losses_in_float64
      >>> y = tf.constant([[1.0]], tf.float64)
      >>> with keras_losses_in_float64():
      ...     keras.losses.MeanSquaredError()(y, y + 1e-10).dtype
      tf.float64
    """
    _require(keras.losses.MeanSquaredError(), "_dtype", "compute a loss in float64")
    call = keras.losses.Loss.__call__

    def in_float64(self: keras.losses.Loss, *args: Any, **kwargs: Any) -> Any:
        kept = getattr(self, "_dtype", None)
        if kept is None:
            return call(self, *args, **kwargs)
        self._dtype = "float64"
        try:
            return call(self, *args, **kwargs)
        finally:
            self._dtype = kept

    keras.losses.Loss.__call__ = in_float64
    try:
        yield
    finally:
        keras.losses.Loss.__call__ = call
