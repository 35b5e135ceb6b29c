"""Step factories: `make_train_step` and `make_eval_step`.

Synopsis::

    train_step = tp.make_train_step(keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    eval_step = tp.make_eval_step(keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    state, logs = train_step(state, (x, y))    # logs: {"loss": ..., "accuracy": ...}
    state, logs = eval_step(state, (x, y))     # touches only state.eval_metrics

A factory returns a `Step`: a callable ``state, logs = step(state, batch)``
that compiles one `tf.function` per state it meets (graph built once per
input signature) and runs the tutorial's loop body inside it:

  * train: ``GradientTape``; ``model(x, training=True)``; loss plus
    ``model.losses``; ``optimizer.scale_loss`` (mixed precision);
    ``optimizer.apply_gradients``; metrics and the batch-size-weighted loss
    tracker updated, as Keras `fit` does;
  * eval: ``model(x, training=False)``; loss plus ``model.losses``; only
    `state.eval_metrics` change.

The graph functions themselves live in `tfpure.graph`; this module holds
the factories, the options and the Python side of a call.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

import numpy as np
import tensorflow as tf

from tfpure.batch import Batch, as_model_loss, check_batch_sizes, unpack
from tfpure.checkpoint import cluster_task
from tfpure.graph import MARK, CompiledStep, Logs
from tfpure.state import TrainState

__all__ = [
    "GradTransform",
    "Logs",
    "NonFiniteError",
    "Step",
    "StepFn",
    "make_eval_step",
    "make_train_step",
]

Nonfinite = Literal["raise", "skip"] | None


class StepFn(Protocol):
    """Anything a loop can drive: ``state, logs = step(state, batch)``."""

    def __call__(self, state: Any, batch: Batch, /) -> tuple[Any, Logs]: ...


class GradTransform(Protocol):
    """Maps gradients to new gradients: ``grads = fn(grads, variables)``."""

    def __call__(
        self, grads: list[tf.Tensor | None], variables: list[Any], /
    ) -> list[tf.Tensor | None]: ...


class NonFiniteError(FloatingPointError):
    """A training step met a non-finite loss or gradient; no variable changed."""


class Step:
    """A compiled training or evaluation step: ``state, logs = step(state, batch)``.

    Made by `make_train_step` and `make_eval_step`; not built directly. The
    step compiles its graph functions the first time it meets a state and
    keeps them while that state lives. The first call traces a signature with
    the batch dimension left free, so every batch size (a ragged last batch
    included) runs the same graph; only a new batch structure or feature
    shape traces again.

    Attributes:
      kind: ``"train"`` or ``"eval"``.
      jit_compile, steps_per_call, nonfinite, grad_transform: the options the
        factory was given.

    Example:
      >>> import keras, numpy as np, tfpure as tp
      >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
      >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD(0.1))
      >>> step = tp.make_train_step(keras.losses.SparseCategoricalCrossentropy(from_logits=True))
      >>> x, y = np.ones((8, 3), "float32"), np.zeros((8,), "int32")
      >>> for _ in range(3):
      ...     state, logs = step(state, (x, y))
      >>> int(state.step), sorted(logs), step.experimental_get_tracing_count()
      (3, ['loss'], 1)
    """

    def __init__(
        self,
        loss: Any,
        *,
        kind: Literal["train", "eval"],
        jit_compile: bool,
        steps_per_call: int,
        nonfinite: Nonfinite,
        grad_transform: GradTransform | Sequence[GradTransform] | None,
    ):
        self.loss = loss
        self.model_loss, self.needs_targets = as_model_loss(loss)
        self.kind = kind
        self.jit_compile = _check_bool("jit_compile", jit_compile)
        self.steps_per_call = _check_steps_per_call(steps_per_call)
        if nonfinite not in ("raise", "skip", None):
            raise ValueError(f"`nonfinite` must be 'raise', 'skip' or None; got {nonfinite!r}.")
        self.nonfinite = nonfinite
        self.grad_transform = _chain(grad_transform)
        self._compiled: weakref.WeakKeyDictionary[TrainState, CompiledStep] = (
            weakref.WeakKeyDictionary()
        )
        self._traces = 0
        self._limits: dict[int, tf.Tensor] = {}

    def _for(self, state: TrainState) -> CompiledStep:
        if not isinstance(state, TrainState):
            raise TypeError(
                f"A tfpure step takes a TrainState first; got {type(state).__name__}. "
                "Build one with tp.TrainState.create(model=..., optimizer=...)."
            )
        compiled = self._compiled.get(state)
        if compiled is None:
            compiled = self._compiled[state] = CompiledStep(self, state)
        return compiled

    def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, Logs]:
        """Runs one step on `batch`; returns the state to use next and the logs.

        `logs` maps `"loss"` and each metric name to its running value since
        the metrics were last reset (as Keras reports them).
        """
        compiled = self._for(state)
        # Batch sizes vary between calls, so the graph cannot see them statically.
        check_batch_sizes(*unpack(batch))
        if not compiled.relaxed:
            compiled.on_batch.get_concrete_function(_relaxed_signature(batch))
            compiled.relaxed = True
        traces = self._traces
        logs = _run(compiled, compiled.on_batch, batch)
        if self._traces != traces:  # A new batch structure: one trace for all its sizes.
            compiled.on_batch.get_concrete_function(_relaxed_signature(batch))
        return state, logs

    def run_on_iterator(
        self, state: TrainState, iterator: Any, *, max_steps: int | None = None
    ) -> tuple[TrainState, Logs, tf.Tensor]:
        """Runs up to `steps_per_call` steps on batches from a `tf.data` iterator.

        `max_steps` lowers the bound for this call (to end an epoch of
        `steps_per_epoch` steps exactly); it is fed as a tensor, so changing
        it does not retrace.

        All the steps run in one graph call (a `tf.while_loop` over
        ``iterator.get_next_as_optional()``), so the end of the data needs no
        special case: fewer steps run, and the count says how many.

        Returns:
          ``(state, logs, steps_run)``, with `steps_run` a scalar int32 tensor
          (0 once the iterator is exhausted).

        Example:
          >>> import keras, tensorflow as tf, tfpure as tp
          >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
          >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())
          >>> step = tp.make_train_step("mse", steps_per_call=4)
          >>> data = tf.data.Dataset.from_tensors((tf.ones((2, 3)), tf.ones((2, 1)))).repeat(6)
          >>> it = iter(data)
          >>> [int(step.run_on_iterator(state, it)[2]) for _ in range(3)]
          [4, 2, 0]
        """
        compiled = self._for(state)
        n, logs = _run(compiled, compiled.on_iterator, iterator, self._limit(max_steps))
        return state, logs, n

    def _prepare(self, state: TrainState, element_spec: Any) -> None:
        """Traces the iterator function for batches of `element_spec`, once.

        The structure, shape and dtype checks run while tracing, so data that
        does not fit the model fails here, before a loop changes anything.
        """
        if not tf.config.functions_run_eagerly() and cluster_task(state.strategy) is None:
            self._for(state).on_iterator.get_concrete_function(
                tf.data.IteratorSpec(element_spec), tf.TensorSpec([], tf.int32)
            )

    def _limit(self, max_steps: int | None) -> tf.Tensor:
        k = self.steps_per_call if max_steps is None else max_steps
        limit = self._limits.get(k)
        if limit is None:
            limit = self._limits[k] = tf.constant(k, tf.int32)
        return limit

    def _epoch(
        self, state: TrainState, iterator: Any
    ) -> Callable[[int | None], tuple[Logs, tf.Tensor]]:
        """Like `run_on_iterator`, but bound to one iterator: `fold`'s fast path."""
        compiled = self._for(state)
        runner = _run(compiled, compiled.epoch_runner, iterator)

        def run(max_steps: int | None) -> tuple[Logs, tf.Tensor]:
            n, logs = _run(compiled, runner, self._limit(max_steps))
            return logs, n

        return run

    def experimental_get_tracing_count(self) -> int:
        """How many times this step's graph functions were traced, over all states.

        Example:
          >>> import keras, tfpure as tp
          >>> tp.make_eval_step("mse").experimental_get_tracing_count()
          0
        """
        return self._traces

    def __repr__(self) -> str:
        return (
            f"Step(kind={self.kind!r}, jit_compile={self.jit_compile}, "
            f"steps_per_call={self.steps_per_call}, nonfinite={self.nonfinite!r})"
        )


def _relaxed_signature(batch: Batch) -> Any:
    """The batch's signature with the batch dimension left free."""

    def relax(leaf: Any) -> Any:
        if isinstance(leaf, tf.Tensor | np.ndarray):
            shape = tuple(leaf.shape)
            return tf.TensorSpec((None, *shape[1:]) if shape else (), tf.as_dtype(leaf.dtype))
        return leaf

    return tf.nest.map_structure(relax, batch)


def _run(compiled: CompiledStep, fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except tf.errors.OpError as err:
        compiled.recover()
        if MARK in err.message:
            raise NonFiniteError(
                f"{compiled.explain_failure()}. No variable changed. Pass "
                "nonfinite='skip' to make_train_step to skip such batches instead."
            ) from None
        raise


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False; got {value!r}.")
    return value


def _check_steps_per_call(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"`steps_per_call` must be an int >= 1 (steps fused in one graph call); got {value!r}."
        )
    return value


def _chain(
    transforms: GradTransform | Sequence[GradTransform] | None,
) -> GradTransform | None:
    if transforms is None:
        return None
    if callable(transforms):
        return transforms
    transforms = list(transforms)
    for t in transforms:
        if not callable(t):
            raise TypeError(
                "`grad_transform` must be a callable (grads, variables) -> grads "
                f"or a list of them; got {t!r}."
            )

    def chained(grads: list[Any], variables: list[Any]) -> list[Any]:
        for t in transforms:
            grads = list(t(grads, variables))
        return grads

    return chained


def make_train_step(
    loss: Any,
    *,
    jit_compile: bool = False,
    steps_per_call: int = 1,
    nonfinite: Nonfinite = "raise",
    grad_transform: GradTransform | Sequence[GradTransform] | None = None,
) -> Step:
    """Returns a compiled training step ``state, logs = step(state, batch)``.

    The step is the tutorial's loop body, compiled: under a `GradientTape` it
    calls ``model(x, training=True)``, adds ``model.losses`` to the loss,
    scales the loss if the optimizer is a `LossScaleOptimizer`, applies the
    gradients and updates `state.metrics` (the `"loss"` tracker weighted by
    batch size, so an epoch's loss is a per-example mean, as in Keras `fit`).

    Args:
      loss: a `keras.losses.Loss` or Keras loss name, a callable
        ``(y_true, y_pred) -> loss``, or a full-control callable
        ``(model, batch, training) -> (loss, y_pred)``. In every case tfpure
        adds ``model.losses`` (regularization) to the loss.
      jit_compile: compile the step with XLA.
      steps_per_call: steps fused into one graph call when the step is driven
        from an iterator (by `fold`, `fit_loop`, `run_on_iterator`); a plain
        ``step(state, batch)`` call always runs one step.
      nonfinite: what a non-finite loss or gradient does. ``"raise"``:
        `NonFiniteError` naming the step and the culprits; ``"skip"``: the
        batch is skipped and counted in ``logs["skipped"]``. Either way no
        model, optimizer or metric variable changes. ``None``: no check, as in
        the hand-written loop (whatever the step computes is applied; a
        failing step may leave BatchNorm statistics moved).
      grad_transform: a callable ``(grads, variables) -> grads`` or a list of
        them, applied in order between the gradient and the optimizer (with a
        `LossScaleOptimizer` they see unscaled gradients).

    Returns:
      A `Step`.

    Raises:
      TypeError: `loss` is not a loss.
      ValueError: an option has an invalid value.

    Example:
      >>> import keras, numpy as np, tfpure as tp
      >>> keras.utils.set_random_seed(0)
      >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
      >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD(0.02))
      >>> step = tp.make_train_step(keras.losses.MeanSquaredError())
      >>> x = np.array([[1.0, 2.0], [3.0, 4.0]], "float32"); y = x.sum(1, keepdims=True)
      >>> losses = []
      >>> for _ in range(20):
      ...     state.reset_metrics()  # logs are running means; keep one step's loss
      ...     state, logs = step(state, (x, y))
      ...     losses.append(float(logs["loss"]))
      >>> losses[-1] < losses[0] / 10
      True
    """
    return Step(
        loss,
        kind="train",
        jit_compile=jit_compile,
        steps_per_call=steps_per_call,
        nonfinite=nonfinite,
        grad_transform=grad_transform,
    )


def make_eval_step(loss: Any, *, jit_compile: bool = False, steps_per_call: int = 1) -> Step:
    """Returns a compiled evaluation step ``state, logs = step(state, batch)``.

    It calls ``model(x, training=False)``, computes the loss plus
    ``model.losses`` and updates only `state.eval_metrics`; no model or
    optimizer variable changes.

    Args:
      loss: as for `make_train_step`.
      jit_compile: compile the step with XLA.
      steps_per_call: steps fused into one graph call when driven from an
        iterator (by `evaluate` or `fit_loop`).

    Example:
      >>> import keras, numpy as np, tfpure as tp
      >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, use_bias=False)])
      >>> model.set_weights([np.ones((2, 1), "float32")])
      >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())
      >>> step = tp.make_eval_step("mse")
      >>> state, logs = step(state, (np.ones((4, 2), "float32"), np.zeros((4, 1), "float32")))
      >>> float(logs["loss"])  # (1 + 1)^2
      4.0
    """
    return Step(
        loss,
        kind="eval",
        jit_compile=jit_compile,
        steps_per_call=steps_per_call,
        nonfinite="raise",
        grad_transform=None,
    )
