"""User-written step bodies: ``fn(states, batch) -> (states, logs)`` on the step engine.

`tp.make_step(fn)` compiles `fn` over a `TrainState` or a dict / tuple / list
of them. `UserBody` adapts `fn` to the engine (`tfpure.graph`):

  * it calls `fn` on one replica's share of the batch and checks what comes
    back: the same states (variables are updated in place; the returned
    structure must hold the states it was given) and logs that are scalars;
  * with a guard, every log, every gradient passed to
    `TrainState.apply_gradients` and, after the body, every floating
    variable of each state's model and optimizer is checked finite; its rollback
    covers every variable of every state (model, optimizer, metrics,
    counters, seed generator), because a body may update one state and then
    fail on the next;
  * the loops report each log as its running mean over the epoch, weighted
    by batch size (what Keras' `Mean` does): `LogMeans` keeps the sums in
    variables, which a `Checkpointer` saves with the run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import tensorflow as tf

from tfpure.batch import Batch, batch_size
from tfpure.compat import supports_no_merge_call
from tfpure.distribute import strategy_of
from tfpure.guard import Checks, Collected, all_finite, collecting, variable
from tfpure.state import (
    TrainState,
    labels,
    leaves,
    owned_variables,
    rebuild,
    structure_difference,
)
from tfpure.types import Logs

if TYPE_CHECKING:
    from tfpure.spec import StepSpec

__all__ = ["LogMeans", "Reported", "UserBody", "log_if"]


class LogMeans:
    """Running, batch-size-weighted means of a user-written step's logs.

    The names are learnt when the body is first traced (sorted, so that the
    same body gives the same layout in every process). One vector of
    `CAPACITY` slots, which a checkpoint saves with the run (so a resumed run
    reports the same epoch means), holds each log's sum in its first half and,
    in its second, the examples of the steps that did not report it
    (`tp.log_if`): a log's mean is over the steps that reported it. A log no
    step of the epoch reported is NaN.
    """

    CAPACITY = 64
    LIMIT = CAPACITY // 2  # logs

    def __init__(self) -> None:
        self.names: list[str] | None = None
        self.totals = variable(tf.zeros([self.CAPACITY], tf.float64), "tfpure_log_totals")
        self.count = variable(tf.constant(0.0, tf.float64), "tfpure_log_count")

    @property
    def variables(self) -> list[tf.Variable]:
        return [self.totals, self.count]

    def learn(self, names: list[str]) -> None:
        if len(names) > self.LIMIT:
            raise ValueError(
                f"The step body returned {len(names)} logs; at most {self.LIMIT} are "
                "averaged. Return fewer (stack related values and log their mean)."
            )
        if self.names is None:
            self.names = names
        elif self.names != names:
            raise ValueError(
                f"The step body returned the logs {names} on this trace but {self.names} "
                "before: a body must return the same log names for every batch (a log "
                "some steps leave out: tp.log_if)."
            )

    def update(self, logs: Logs, reported: Logs, n: tf.Tensor) -> list[Any]:
        """Adds a kept step's `logs` over `n` examples; `reported`: 1.0 / 0.0 by log name."""
        names = self.names or []
        n = tf.cast(n, tf.float64)
        shares = tf.stack([tf.cast(reported[name], tf.float64) for name in names] or [0.0])
        values = tf.stack([tf.cast(logs[name], tf.float64) for name in names] or [0.0])
        values = tf.where(shares > 0, values, tf.zeros_like(values))  # (a NaN not reported)

        def padded(vector: tf.Tensor) -> tf.Tensor:
            return tf.pad(vector[: len(names)], [[0, self.LIMIT - len(names)]])

        packed = tf.concat([padded(values * n), padded((1.0 - shares) * n)], 0)
        return [self.totals.assign_add(packed), self.count.assign_add(n)]

    def results(self) -> Logs:
        totals, count = self.totals.value(), self.count.value()
        out = {}
        for i, name in enumerate(self.names or []):
            reported = count - totals[self.LIMIT + i]
            none = tf.where(count > 0, tf.constant(float("nan"), tf.float64), 0.0)
            mean = tf.where(reported > 0, totals[i] / tf.maximum(reported, 1.0), none)
            out[name] = tf.cast(mean, tf.float32)
        return out

    def reset(self) -> None:
        self.totals.assign(tf.zeros([self.CAPACITY], tf.float64))
        self.count.assign(0.0)


@attrs.frozen
class Reported:
    """A log `value` that counts only on the steps where `when` holds (`tp.log_if`)."""

    when: Any
    value: Any


def log_if(when: Any, value: Any) -> Reported:
    """A log that this step reports only if `when` holds: its epoch mean is over those steps.

    Return it among a `make_step` body's logs, e.g. a generator loss computed
    on one step in five (``{"g_loss": tp.log_if(d.step % 5 == 0, g_loss)}``).
    A step where `when` is false leaves the log out: it adds nothing to the
    log's running mean (which weighs the steps that reported it by batch size,
    fused calls and resumed runs alike), and the guard does not check its
    value. A log that no step of the epoch reported reads NaN.

    Args:
      when: a boolean scalar (tensor or Python bool).
      value: the log's value, a number scalar.

    Example:
      >>> import keras, numpy as np, tensorflow as tf, tfpure as tp
      >>> model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
      >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD(0.0))
      >>> def body(state, batch):
      ...     state.step.assign_add(1)
      ...     return state, {"even": tp.log_if(state.step % 2 == 0, tf.cast(state.step, "float32"))}
      >>> step = tp.make_step(body)
      >>> for _ in range(4):  # steps 1, 2, 3, 4: steps 2 and 4 report
      ...     state, logs = step(state, (np.ones((1, 1), "float32"),))
      >>> float(logs["even"])
      3.0
    """
    return Reported(when, value)


def _check_returned(states: Any, given: list[TrainState], returned: Any) -> None:
    difference = structure_difference(states, returned)
    if difference:
        raise TypeError(
            "A step body must return (states, logs) with `states` of the structure it "
            f"was given: {difference}."
        )
    for a, b in zip(given, leaves(returned), strict=True):
        if b.model is not a.model or b.optimizer is not a.optimizer:  # leaves() checked the type
            raise TypeError(
                "A step body must return the states it was given (variables change in "
                "place; `state.apply_gradients(grads)` returns the state to return); got "
                f"{type(b).__name__} in place of the state of model {a.model.name!r}."
            )


def _check_logs(logs: Any) -> tuple[Logs, Logs]:
    """The body's logs as scalar tensors, and whether each is reported (1.0 / 0.0)."""
    if not isinstance(logs, dict) or not all(isinstance(k, str) for k in logs):
        raise TypeError(
            "A step body must return (states, logs) with logs a dict of name -> scalar "
            f"tensor; got logs of type {type(logs).__name__}."
        )
    out, reported = {}, {}
    for name, value in logs.items():
        when = tf.constant(True)
        if isinstance(value, Reported):
            when, value = tf.convert_to_tensor(value.when), value.value
            if when.shape.rank != 0 or when.dtype != tf.bool:
                raise TypeError(
                    f"tp.log_if's condition for log {name!r} must be a boolean scalar; got "
                    f"{when.dtype.name} of shape {when.shape}."
                )
        value = tf.convert_to_tensor(value)
        if value.shape.rank != 0:
            raise ValueError(
                f"Log {name!r} of the step body has shape {value.shape}; logs must be "
                "scalars (reduce them, e.g. tf.reduce_mean)."
            )
        if not (value.dtype.is_floating or value.dtype.is_integer):
            raise TypeError(f"Log {name!r} of the step body is {value.dtype.name}, not a number.")
        out[name], reported[name] = value, tf.cast(when, tf.float32)
    return out, reported


class UserBody:
    """A user-written ``fn(states, batch) -> (states, logs)`` as an engine body.

    Holds the structure and each state's fields, not the states themselves:
    a step's per-state cache must not keep them alive. The states `fn` sees
    are rebuilt from those fields (the same handles).
    """

    train = True
    model = None  # no declared inputs: batch signatures are widened freely
    held_variables: Sequence[Any] = ()  # every variable it may write has a shadow

    def __init__(self, spec: StepSpec, fn: Callable[[Any, Batch], Any], states: Any):
        self.spec, self.fn = spec, _converted(fn) if spec.autograph else fn
        given = leaves(states)
        self._template = rebuild(states, [None] * len(given))
        self._fields = [attrs.asdict(s, recurse=False) for s in given]
        self.strategy = strategy_of(given)
        self.merge_free = supports_no_merge_call()
        self.checks = Checks()
        # Each state as messages name it (`states['d']`), by the id of its model.
        self.labels = dict(zip((id(s.model) for s in given), labels(states), strict=True))
        self.means = LogMeans()
        # The log means move only when a step is kept (`merge`): no need to save them.
        self.rollback_variables = [v for s in given for v in owned_variables(s)]
        self.also_written = self.means.variables  # put back when a call is replayed

    def _states(self) -> tuple[Any, list[TrainState]]:
        rebuilt = [TrainState(**fields) for fields in self._fields]
        return rebuild(self._template, rebuilt), rebuilt

    def one(
        self, batch: Batch, judge: bool = True, ordered: bool = True
    ) -> tuple[tf.Tensor, Logs, tf.Tensor]:
        """Runs the body on one replica; returns (failed checks as 0/1, logs, examples).
        (`ordered` unused: the body's updates run in its own order.)

        Not `judge`: a step of a call judged at its end, which checks nothing itself: a
        non-finite log stays in the sums of the logs, a non-finite gradient applied in the
        variables it updates, and `verdict` judges both once the call ran.
        """
        states, given = self._states()
        guarded = self.spec.nonfinite is not None
        unguarded = contextlib.nullcontext(Collected())
        with collecting(self.labels) if guarded and judge else unguarded as collected:
            returned, logs = _unpack_result(_call_body(self.fn, states, batch))
        _check_returned(states, given, returned)
        logs, reported = _check_logs(logs)
        self.means.learn(sorted(logs))
        if guarded and not judge:  # its logs and its states judged once the call ran
            return tf.zeros([1], tf.int32), logs, reported, batch_size(batch)
        for name in sorted(logs) if guarded else ():
            if logs[name].dtype.is_floating:  # (a log not reported is not checked)
                left_out = tf.equal(reported[name], 0.0)
                collected.add(f"log {name!r}", left_out | tf.math.is_finite(logs[name]))
        for state in given if guarded else ():  # the state the body left, read after it
            collected.add(f"variables of {self.labels[id(state.model)]}", self._finite(state))
        failed = tf.cast(tf.logical_not(self.checks.settle(collected)), tf.int32)
        return failed, logs, reported, batch_size(batch)

    @staticmethod
    def _finite(state: TrainState) -> tf.Tensor:
        """Whether every variable of `state`'s model and optimizer is finite."""
        optimizer = state.optimizer.variables if state.optimizer is not None else []
        return all_finite([*state.model.variables, *optimizer])

    def verdict(self) -> tf.Tensor:
        """Whether the states a call judged at its end left are finite (every variable),
        and the sums of its logs, which keep a non-finite log of any step of the call."""
        states = [self._finite(state) for state in self._states()[1]]
        return tf.reduce_all([*states, all_finite(self.means.variables)])

    def merge(self, out: Any, record: bool = True) -> tuple[tf.Tensor, tf.Tensor]:
        """Sums the replicas' logs and examples; updates the means if every check passed.

        Unless `record`: then the means are updated in any case (a step that is
        replayed if it is not kept), and no failure is recorded.
        """
        failed, logs, reported, n = out
        if self.strategy is not None:
            s, total, mean = self.strategy, tf.distribute.ReduceOp.SUM, tf.distribute.ReduceOp.MEAN
            failed = s.reduce(total, failed, axis=None)
            logs = {k: s.reduce(total, v, axis=None) for k, v in logs.items()}
            reported = {k: s.reduce(mean, v, axis=None) for k, v in reported.items()}
            n = s.reduce(total, n, axis=None)
        flags = tf.equal(failed, 0)
        ok = tf.reduce_all(flags)

        def commit() -> tf.Tensor:
            with tf.control_dependencies(self.means.update(logs, reported, n)):
                return tf.constant(True)

        def record_failure() -> tf.Tensor:
            with tf.control_dependencies([self.checks.record.assign(flags)]):
                return tf.constant(False)

        if self.spec.nonfinite is None:
            kept = commit()
        elif not record:
            with tf.control_dependencies([commit()]):
                kept = tf.identity(ok)
        else:
            kept = tf.cond(ok, commit, record_failure)
        return kept, kept

    def on_skip(self) -> list[Any]:
        return [fields["skipped"].assign_add(1) for fields in self._fields]

    def label_checks(self, batch: Any) -> list[Any]:
        """None: a user-written body's labels are its own."""
        return []

    def logs(self) -> Logs:
        logs = self.means.results()
        if self.spec.nonfinite == "skip":
            logs["skipped"] = tf.identity(self._fields[0]["skipped"].value())
        return logs

    def explain_failure(self) -> str:
        where = ", ".join(
            f"{self.labels[id(f['model'])]} at step {int(f['step'].numpy())}" for f in self._fields
        )
        return f"the step body ({where}) met non-finite values: {self.checks.failed()}"


def _call_body(fn: Callable[[Any, Batch], Any], states: Any, batch: Batch) -> Any:
    """``fn(states, batch)``; a state reassigned inside a converted branch named as such."""
    try:
        return fn(states, batch)
    except TypeError as err:
        if "found return value of type" not in str(err) or "_stmt" not in str(err):
            raise
        raise TypeError(
            "A state was reassigned inside Python control flow on a tensor (`if d.step % 5 "
            "== 0: d = d.apply_gradients(grads)`): autograph would carry it out of the "
            "branch, and a state is no tensor. Call `d.apply_gradients(grads)` there without "
            "reassigning it (it updates the state in place and returns the same state). "
            f"TensorFlow said: {str(err).splitlines()[0]}"
        ) from err


def _converted(fn: Callable[[Any, Batch], Any]) -> Callable[[Any, Batch], Any]:
    """`fn` with its Python control flow on tensors converted by autograph (as `tf.function`
    converts it by default); `fn` itself if autograph cannot convert it."""
    try:
        return tf.autograph.to_graph(fn)
    except Exception:  # (a callable autograph cannot read: traced as written)
        return fn


def _unpack_result(result: Any) -> tuple[Any, Any]:
    if not isinstance(result, tuple) or len(result) != 2:
        size = f" of {len(result)}" if isinstance(result, tuple) else ""
        raise TypeError(
            f"A step body must return a pair (states, logs); got {type(result).__name__}{size}."
        )
    return result
