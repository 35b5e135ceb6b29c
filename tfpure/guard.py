"""The non-finite guard: a step that meets a non-finite value changes nothing.

A guarded step checks, after the step body ran and before anything it did
is kept, that its loss and gradients were finite. For a built-in step the
check sees every gradient before the optimizer runs, so only the variables
the forward pass moved (BatchNorm statistics, Dropout's seed) need putting
back. A user-written body may update several states one after the other (a
GAN's discriminator, then its generator), so the guard saves every variable
of every state first and puts them all back if any check fails: one rule,
"no variable of any state changes".

The pieces, used by `tfpure.graph`:

  * `Rollback`: shadow copies of a list of variables, saved at the start of
    a step and put back when it fails (and after a graph error, by `recover`);
  * `Checks`: the finiteness checks a user-written body collects while it is
    traced (each log, each `TrainState.apply_gradients` call), and the record
    of which failed;
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


class Rollback:
    """Shadow copies of `variables`: saved before a step, put back if it fails.

    Create it under the strategy's scope (the shadows are mirrored like the
    variables). `save` and `restore` return the ops to run inside the step's
    graph, in the cross-replica (or default) context; `recover` runs eagerly
    after a failed graph call.
    """

    def __init__(self, variables: Sequence[Any]):
        self.variables = list(variables)
        self.shadows = [variable(_read(v), "tfpure_shadow") for v in self.variables]
        self.armed = variable(False, "tfpure_armed")

    def save(self) -> list[Any]:
        ops = [s.assign(_read(v)) for s, v in zip(self.shadows, self.variables, strict=True)]
        return [*ops, self.armed.assign(True)]

    def restore(self) -> list[Any]:
        return [v.assign(s.read_value()) for s, v in zip(self.shadows, self.variables, strict=True)]

    def disarm(self) -> Any:
        return self.armed.assign(False)

    def recover(self) -> None:
        """After a graph call failed half-way: puts back what the step moved."""
        if bool(self.armed.numpy()):
            for s, v in zip(self.shadows, self.variables, strict=True):
                v.assign(s.read_value())
            self.armed.assign(False)


class Collected:
    """The checks one trace of a body made on one replica: names and bool tensors."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.flags: list[tf.Tensor] = []

    def add(self, name: str, ok: tf.Tensor) -> None:
        self.names.append(name)
        self.flags.append(ok)


_collector = threading.local()


@contextlib.contextmanager
def collecting() -> Iterator[Collected]:
    """Routes the `record_gradients` calls of a body being traced to a fresh `Collected`.

    Thread-local: MirroredStrategy traces each replica's body in a thread of
    its own, interleaved at its all-reduces.
    """
    previous = getattr(_collector, "current", None)
    current = _collector.current = Collected()
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


def record_gradients(name: str, grads: Sequence[Any], *, loss_scaled: bool) -> None:
    """Adds a check that `grads` are finite, if a guarded body is being traced.

    A `LossScaleOptimizer` handles non-finite gradients itself (it skips the
    update and lowers its scale), so its gradients are not checked.
    """
    checks = getattr(_collector, "current", None)
    if checks is None or loss_scaled:
        return
    present = [g.values if isinstance(g, tf.IndexedSlices) else g for g in grads if g is not None]
    if present:
        total = tf.add_n([tf.cast(tf.reduce_sum(g), tf.float32) for g in present])
        checks.add(f"gradients of {name}", tf.math.is_finite(total))
