"""The non-finite guard: a step that leaves a non-finite value changes nothing.

A guarded step runs, then checks the state it left, and puts back what it
moved if a check fails. A built-in step checks its loss and every floating
variable of the model and the optimizer (weights, slots, BatchNorm
statistics) after the update; a user-written body's logs, the gradients it
applies through `TrainState.apply_gradients`, and its states' variables
after it. One rule: "no variable of any state changes" when a check fails.

The pieces, used by `tfpure.graph`:

  * `Rollback`: what a step may move, saved at its start and put back when
    it fails (shadow copies, which `recover` also puts back after a graph
    error, and values held within the step);
  * `Checks`: the finiteness checks a user-written body collects while it is
    traced, and the record of which failed;
  * `finite_flags` / `all_finite`: exact checks (no sum that can overflow);
  * `NonFiniteError` and `MARK`, the assertion text a failing "raise" step
    carries out of the graph.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import tensorflow as tf

__all__ = [
    "MARK",
    "Checks",
    "Collected",
    "NonFiniteError",
    "Rollback",
    "all_finite",
    "components",
    "finite_flags",
    "collecting",
    "record_gradients",
]

# The message of the assertion that fails a "raise" step; `Step` turns it into
# a `NonFiniteError`.
MARK = "tfpure.NonFinite"


class NonFiniteError(FloatingPointError):
    """A training step met a non-finite loss or gradient; no variable changed.

    Raised by steps built with ``nonfinite="raise"`` (the default). The
    message names the step, the loss and the variables whose gradients were
    not finite.

    Example:
      >>> import keras, numpy as np, tfpure as tp
      >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
      >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())
      >>> x = np.array([[np.nan, 1.0]], "float32")
      >>> try:
      ...     tp.make_train_step("mse")(state, (x, np.zeros((1, 1), "float32")))
      ... except tp.NonFiniteError as err:
      ...     print(type(err).__name__, int(state.step))
      NonFiniteError 0
    """


def variable(initial: Any, name: str, shape: Any = None) -> tf.Variable:
    """A bookkeeping variable; under a strategy every replica holds the same value."""
    return tf.Variable(
        initial,
        trainable=False,
        name=name,
        shape=shape,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
    )


def _read(v: Any) -> tf.Tensor:
    """The value of a Keras or a TensorFlow variable."""
    return tf.convert_to_tensor(v)


def components(v: Any) -> list[Any]:
    """The per-device variables behind `v`: one, or one per replica under a strategy."""
    inner = v if isinstance(v, tf.Variable) else getattr(v, "value", None)  # a Keras variable's
    if isinstance(inner, tf.distribute.DistributedValues):
        return list(inner.values)
    return [v]


def finite_flags(tensors: Sequence[Any]) -> tf.Tensor:
    """For each tensor, whether all its elements are finite: a bool vector.

    `None` and integer entries count as finite.

    Example:
      >>> import numpy as np
      >>> from tfpure.guard import finite_flags
      >>> finite_flags([np.float32([3e38, 3e38]), None, [np.inf], [1]]).numpy().tolist()
      [True, True, False, True]
    """
    flags = []
    for t in tensors:
        if t is not None:
            t = t.values if isinstance(t, tf.IndexedSlices) else tf.convert_to_tensor(t)
        finite = t is None or not t.dtype.is_floating
        flags.append(tf.constant(True) if finite else tf.reduce_all(tf.math.is_finite(t)))
    return tf.stack(flags) if flags else tf.zeros([0], tf.bool)


def all_finite(tensors: Sequence[Any]) -> tf.Tensor:
    """Whether every element of every floating tensor is finite: one bool scalar.

    Exact: no sum of large finite values can overflow into a false alarm.

    Example:
      >>> import numpy as np
      >>> from tfpure.guard import all_finite
      >>> bool(all_finite([np.float32([3e38, 3e38]), None])), bool(all_finite([[np.inf]]))
      (True, False)
    """
    return tf.reduce_all(finite_flags(tensors))


class Rollback:
    """What a step may move, saved before it and put back if it fails.

    `variables` get shadow copies (variables of their own): they are put
    back in the step's graph, and also by `recover` after a graph call that
    failed at run time half-way through a step. `held` variables are only
    held as the values read before the step, in its graph (an update in place
    then writes a copy instead of overwriting them: no separate copy op); put
    back in the graph alone. A built-in step's run-time errors come from its
    forward pass (a label out of range), which its update waits for, so only
    the variables the forward pass moves need shadows.

    Create it under the strategy's scope (the shadows are mirrored like the
    variables). Under a strategy each replica's copy is saved and put back on
    its own: replicas may hold different values (BatchNorm statistics of
    their shards, a metric's partial sums). `save` and `restore` return the
    ops to run inside the step's graph, in the cross-replica (or default)
    context; `recover` runs eagerly after a failed graph call.
    """

    def __init__(self, variables: Sequence[Any], held: Sequence[Any] = ()):
        self.pairs = []
        for v in variables:
            s = variable(_read(v), "tfpure_shadow")
            parts, copies = components(v), components(s)
            if len(parts) != len(copies):  # placed otherwise than its shadow: one value
                parts, copies = [v], [s]
            self.pairs.extend(zip(copies, parts, strict=True))
        self.held = [part for v in held for part in components(v)]
        self.covered = [v for _, v in self.pairs] + self.held  # every variable put back
        self.armed = variable(False, "tfpure_armed")

    def save(self) -> tuple[list[Any], list[tf.Tensor]]:
        """The ops that save the shadows, and the held variables' values."""
        shadows = [s.assign(_read(v)) for s, v in self.pairs]
        return [*shadows, self.armed.assign(True)], [_read(v) for v in self.held]

    def restore(self, held: Sequence[tf.Tensor]) -> list[Any]:
        shadows = [v.assign(s.read_value()) for s, v in self.pairs]
        return [*shadows, *(v.assign(value) for v, value in zip(self.held, held, strict=True))]

    def disarm(self) -> Any:
        return self.armed.assign(False)

    def recover(self) -> None:
        """After a graph call failed half-way: puts back what the forward pass moved."""
        if bool(self.armed.numpy()):
            for s, v in self.pairs:
                v.assign(s.read_value())
            self.armed.assign(False)


class Collected:
    """The checks one trace of a body made on one replica: names and bool tensors.

    Made in the body's graph: a check made inside a branch of its control flow
    (an update under `tf.cond`, in a loop) is not collected, since its tensor
    cannot leave the branch; what such an update wrote is checked with the
    state's variables after the body.
    """

    def __init__(self, labels: dict[int, str] | None = None) -> None:
        self.names: list[str] = []
        self.flags: list[tf.Tensor] = []
        self.graph = tf.compat.v1.get_default_graph()
        # How the body's states are named (by id of their model): `states['d']`.
        self.labels = labels or {}

    def add(self, name: str, ok: tf.Tensor) -> None:
        self.names.append(name)
        self.flags.append(ok)


_collector = threading.local()


@contextlib.contextmanager
def collecting(labels: dict[int, str] | None = None) -> Iterator[Collected]:
    """Routes the `record_gradients` calls of a body being traced to a fresh `Collected`
    (`labels`: each state's name, by the id of its model).

    Thread-local: MirroredStrategy traces each replica's body in a thread of
    its own, interleaved at its all-reduces.
    """
    previous = getattr(_collector, "current", None)
    current = _collector.current = Collected(labels)
    try:
        yield current
    finally:
        _collector.current = previous


class Checks:
    """The finiteness checks of a user-written body, and the record of which failed.

    Every trace of the body must make the same checks; their names are kept
    in Python, and the flags of the last failed step in `record`, to explain
    the failure.
    """

    def __init__(self) -> None:
        self.names: list[str] | None = None
        self.record = variable(tf.ones([self.CAPACITY], tf.bool), "tfpure_checks")

    CAPACITY = 256  # checks recorded to explain a failure; more are checked, not named

    def settle(self, collected: Collected) -> tf.Tensor:
        """Ends a trace of the body; returns its flags, padded to `CAPACITY`, as a bool vector."""
        if self.names is None:
            self.names = list(collected.names)
        elif self.names != collected.names:
            raise ValueError(
                "The step body made other checks on this trace than on an earlier one "
                f"({collected.names} vs {self.names}): its logs and apply_gradients calls "
                "must not depend on the batch's structure."
            )
        flags = tf.stack([*collected.flags, tf.constant(True)])
        if len(collected.flags) >= self.CAPACITY:
            return tf.concat([flags[: self.CAPACITY - 1], tf.reduce_all(flags)[None]], 0)
        return tf.pad(flags, [[0, self.CAPACITY - len(collected.flags) - 1]], constant_values=True)

    def failed(self) -> list[str]:
        """The names of the checks the last failed step did not pass."""
        flags = self.record.numpy()
        return [name for name, ok in zip(self.names or [], flags, strict=False) if not ok]


def record_gradients(model: Any, grads: Sequence[Any], *, loss_scaled: bool) -> None:
    """Adds a check that `grads` are finite, if a guarded body is being traced.

    A `LossScaleOptimizer` handles non-finite gradients itself (it skips the
    update and lowers its scale), so its gradients are not checked.
    """
    checks = getattr(_collector, "current", None)
    if checks is None or loss_scaled or tf.compat.v1.get_default_graph() is not checks.graph:
        return  # (inside a branch: the variables it wrote are checked after the body)
    if any(g is not None for g in grads):
        checks.add(f"gradients of {checks.labels.get(id(model), model.name)}", all_finite(grads))
