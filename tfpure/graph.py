"""The graph functions a step runs for one state.

`make_train_step` and `make_eval_step` return a `Step`; the first time a step
meets a state it builds a `CompiledStep` here, holding that state's
`tf.function`s:

  * ``one(batch)``: one training or evaluation step (under XLA with
    ``jit_compile=True``), returning whether it was applied;
  * ``on_batch(batch) -> logs``: a call on one batch;
  * ``on_iterator(iterator, k) -> (steps_run, logs)``: up to `k` steps pulled
    from a `tf.data` iterator inside the graph.

Invariant of every guarded train step: when the loss or a gradient is not
finite, or the graph fails at run time (a label out of range, say), no model,
optimizer or metric variable changes. Non-trainable model variables
(BatchNorm statistics, Dropout's seed) move during the forward pass, so the
step saves them first and puts them back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

from tfpure.batch import Batch, batch_size, check_batch, unpack
from tfpure.checkpoint import cluster_task
from tfpure.state import TrainState

if TYPE_CHECKING:
    from tfpure.steps import Step

__all__ = ["MARK", "CompiledStep", "Logs", "metric_results"]

Logs = dict[str, tf.Tensor]

# The message of the assertion that fails a "raise" step; `Step` turns it into
# a `NonFiniteError`.
MARK = "tfpure.NonFinite"


def metric_results(metrics: dict[str, keras.metrics.Metric]) -> Logs:
    """The current value of each metric, dict-valued results flattened as Keras does."""
    logs: Logs = {}
    for name, metric in metrics.items():
        result = metric.result()
        if isinstance(result, dict):  # Keras flattens dict-valued metrics.
            logs.update(result)
        else:
            logs[name] = result
    return logs


def _variable(initial: Any, name: str) -> tf.Variable:
    # ONLY_FIRST_REPLICA: replicas hold the same value, and may write it.
    return tf.Variable(
        initial,
        trainable=False,
        name=name,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
    )


class CompiledStep:
    """The graph functions of one step for one state.

    Holds the state's fields, never the state itself, so that the step's
    per-state cache (a `WeakKeyDictionary`) lets states die.

    The hot path of a guarded train step adds as few ops as it can: one
    finiteness test of ``loss + sum(sum(g) for g in grads)`` (non-finite if
    any element is, or if the sum overflows), one `tf.cond`, and the save of
    the non-trainable variables. What went wrong is recorded only on the
    failure branch and read back in Python to explain the failure.
    """

    def __init__(self, step: Step, state: TrainState):
        self.step_fn = step
        self.model = state.model
        self.optimizer = state.optimizer
        self.counter = state.step
        self.skipped = state.skipped
        self.train = step.kind == "train"
        self.guarded = self.train and step.nonfinite is not None
        self.metrics = dict(state.metrics if self.train else state.eval_metrics)
        self.trainable = list(state.model.trainable_variables)
        self.loss_scaled = isinstance(state.optimizer, keras.optimizers.LossScaleOptimizer)
        self.strategy = state.strategy
        # Several processes: the loops hand over per-replica batches (see _run_one).
        self.sharded = cluster_task(self.strategy) is not None
        scope = self.strategy.scope() if self.strategy else contextlib.nullcontext()
        with scope:
            # Under MirroredStrategy the optimizer's gradient all-reduce goes
            # through merge_call, which cannot sit inside a replica's tf.cond.
            self.merge_free = tf.__internal__.distribute.strategy_supports_no_merge_call()
            if self.guarded:
                # Saved at the start of every step, put back if the step fails.
                self.frozen = list(state.model.non_trainable_variables)
                self.shadows = [_variable(v.value, "tfpure_shadow") for v in self.frozen]
                self.armed = _variable(False, "tfpure_armed")
                # What the last failed step saw; read only to explain the failure.
                self.bad_loss = _variable(0.0, "tfpure_bad_loss")
                self.bad_grads = _variable(
                    tf.ones([len(self.trainable)], tf.bool), "tfpure_bad_grads"
                )
        if step.jit_compile and self.strategy is not None and not self.merge_free:
            raise ValueError(
                f"jit_compile=True is not supported under {type(self.strategy).__name__}: its "
                "gradient all-reduce cannot run inside XLA. Use jit_compile=False there."
            )
        one = self._train_one if self.train else self._eval_one
        if step.jit_compile:
            one = tf.function(one, jit_compile=True, reduce_retracing=True)
        self.one = one
        # Exact signatures: `Step.__call__` traces a batch-size-free signature
        # first, which every later batch size dispatches to. (Relaxing shapes
        # by reduce_retracing would also relax feature sizes past the checks.)
        self.on_batch = tf.function(self._on_batch, autograph=False)
        self.relaxed = False
        self.on_iterator = tf.function(self._on_iterator, reduce_retracing=True, autograph=False)

    # -- one step, possibly under XLA ---------------------------------------

    def _losses(self, loss: tf.Tensor, x: Any) -> tuple[tf.Tensor, tf.Tensor]:
        """The loss to differentiate, and the loss to report, from the model loss.

        On one device both are ``loss + sum(model.losses)``, as in the
        tutorial and Keras `fit`. On R replicas each replica differentiates its
        share so that the summed gradients equal the single-device gradient:
        Keras losses arrive divided by R; a per-example mean is instead
        weighted by the replica's share of the examples (exact when the last
        batch splits unevenly), and regularization is divided by R (counted
        once). The reported loss is the replica's own mean plus the
        regularization, which the batch-size-weighted tracker averages.
        """
        extra = self.model.losses
        context = tf.distribute.get_replica_context()
        replicas = context.num_replicas_in_sync if self.strategy is not None else 1
        if replicas == 1:
            total = loss + sum(extra) if extra else loss
            return total, total
        model_loss = self.step_fn.model_loss
        regularization = sum(extra) if extra else tf.zeros_like(loss)
        mean = loss * replicas if getattr(model_loss, "replica_scaled", True) else loss
        if getattr(model_loss, "per_example_mean", False):
            n = tf.cast(batch_size(x), loss.dtype)
            objective = mean * n / context.all_reduce("sum", n)
        else:
            objective = loss
        return objective + regularization / replicas, mean + regularization

    def _train_one(self, batch: Batch) -> tf.Tensor:
        """One training step (on one replica); returns whether it was applied."""
        x, y, sample_weight = unpack(batch)
        check_batch(self.model, x, y, sample_weight)
        saves = []
        if self.guarded:
            saves = [self.armed.assign(True)]
            saves += [s.assign(v.value) for s, v in zip(self.shadows, self.frozen, strict=True)]
        with tf.control_dependencies(saves), tf.GradientTape() as tape:
            loss, y_pred = self.step_fn.model_loss(self.model, batch, True)
            objective, reported = self._losses(loss, x)
            scaled = self.optimizer.scale_loss(objective)
        grads = tape.gradient(scaled, self.trainable)
        if self.step_fn.grad_transform is not None:
            grads = self._transform(grads)
        present = [g for g in grads if g is not None]
        if not present:
            raise ValueError(
                f"No gradient reaches any trainable variable of {self.model.name!r}: "
                "the loss does not depend on the model's weights."
            )
        self._check_metrics(y_pred)
        applied = (grads, reported, x, y, y_pred, sample_weight)
        if not self.guarded:  # The hand-written loop: apply whatever came out.
            return self._commit(*applied)

        total = tf.cast(reported, tf.float32)
        if not self.loss_scaled:  # LossScaleOptimizer skips overflowing steps itself.
            total += tf.add_n([tf.cast(tf.reduce_sum(g), tf.float32) for g in present])
        ok = tf.math.is_finite(total)
        if self.strategy is not None:  # every replica must take the same branch
            context = tf.distribute.get_replica_context()
            ok = tf.equal(context.all_reduce("sum", 1.0 - tf.cast(ok, tf.float32)), 0.0)
        if self.strategy is None or self.merge_free:
            done = tf.cond(
                ok, lambda: self._commit(*applied), lambda: self._revert(reported, grads)
            )
        else:
            done = tf.distribute.get_replica_context().merge_call(
                self._cross_replica_cond, args=(ok, *applied)
            )
        with tf.control_dependencies([done]):
            disarm = self.armed.assign(False)
        with tf.control_dependencies([disarm]):
            return tf.identity(done)

    def _commit(self, grads, reported, x, y, y_pred, sample_weight) -> tf.Tensor:
        self.optimizer.apply_gradients(zip(grads, self.trainable, strict=True))
        self._update_metrics(reported, x, y, y_pred, sample_weight)
        self.counter.assign_add(1)
        return tf.constant(True)

    def _revert(self, loss: tf.Tensor, grads: list[Any]) -> tf.Tensor:
        for s, v in zip(self.shadows, self.frozen, strict=True):
            v.assign(s)
        self.bad_loss.assign(tf.cast(loss, tf.float32))
        flags = [
            tf.constant(True) if g is None else tf.reduce_all(tf.math.is_finite(g)) for g in grads
        ]
        self.bad_grads.assign(tf.stack(flags))
        if self.step_fn.nonfinite == "skip":
            self.counter.assign_add(1)
            self.skipped.assign_add(1)
        return tf.constant(False)

    def _cross_replica_cond(
        self, strategy: Any, ok: Any, grads: Any, reported: Any, *rest: Any
    ) -> tf.Tensor:
        """The guard's branch, taken in cross-replica context (as LossScaleOptimizer does)."""
        first = strategy.experimental_local_results

        def commit() -> tf.Tensor:
            strategy.extended.call_for_each_replica(self._commit, args=(grads, reported, *rest))
            return tf.constant(True)

        def revert() -> tf.Tensor:
            local = [None if g is None else first(g)[0] for g in grads]
            return self._revert(first(reported)[0], local)

        return tf.cond(first(ok)[0], commit, revert)

    def _update_metrics(
        self, loss: tf.Tensor, x: Any, y: Any, y_pred: Any, sample_weight: Any
    ) -> None:
        # As Keras `fit`: the loss tracker is weighted by batch size, so an
        # epoch's loss is a per-example mean even with a ragged last batch.
        self.metrics["loss"].update_state(loss, sample_weight=batch_size(x))
        for name, metric in self.metrics.items():
            if name != "loss":
                metric.update_state(y, y_pred, sample_weight=sample_weight)

    def _transform(self, grads: list[Any]) -> list[Any]:
        transform = self.step_fn.grad_transform
        if not self.loss_scaled:
            return list(transform(list(grads), self.trainable))
        # The transform sees true gradients; LossScaleOptimizer unscales later.
        scale = self.optimizer.dynamic_scale
        unscaled = [None if g is None else g / scale for g in grads]
        return [None if g is None else g * scale for g in transform(unscaled, self.trainable)]

    def _eval_one(self, batch: Batch) -> tf.Tensor:
        x, y, sample_weight = unpack(batch)
        check_batch(self.model, x, y, sample_weight)
        loss, y_pred = self.step_fn.model_loss(self.model, batch, False)
        _, loss = self._losses(loss, x)
        self._check_metrics(y_pred)
        # Nothing is counted unless the whole batch was scored.
        with tf.control_dependencies([loss]):
            self._update_metrics(loss, x, y, y_pred, sample_weight)
        return tf.constant(True)

    def _check_metrics(self, y_pred: Any) -> None:
        if y_pred is None and len(self.metrics) > 1:
            raise ValueError(
                "The loss function returned y_pred=None, but the metrics "
                f"{sorted(set(self.metrics) - {'loss'})} need predictions: "
                "return (loss, y_pred)."
            )

    # -- graph entry points ---------------------------------------------------

    def _guard(self, ok: tf.Tensor) -> list:
        """In "raise" mode, fails the call if a step was not applied."""
        if self.train and self.step_fn.nonfinite == "raise":
            return [tf.debugging.Assert(ok, [MARK])]
        return []

    def _on_batch(self, batch: Batch) -> Logs:
        self.step_fn._traces += 1
        ok = self._run_one(batch)
        with tf.control_dependencies(self._guard(ok)):
            return self._logs()

    def _on_iterator(self, iterator: Any, k: tf.Tensor) -> tuple[tf.Tensor, Logs]:
        self.step_fn._traces += 1
        stop_on_failure = self.train and self.step_fn.nonfinite == "raise"

        def cond(i: tf.Tensor, ok: tf.Tensor, more: tf.Tensor) -> tf.Tensor:
            keep = tf.logical_and(i < k, more)
            return tf.logical_and(keep, ok) if stop_on_failure else keep

        def body(i: tf.Tensor, ok: tf.Tensor, more: tf.Tensor) -> tuple:
            optional = iterator.get_next_as_optional()
            return tf.cond(
                optional.has_value(),
                lambda: (i + 1, self._run_one(optional.get_value()), tf.constant(True)),
                lambda: (i, ok, tf.constant(False)),
            )

        start = (tf.constant(0), tf.constant(True), tf.constant(True))
        if self.step_fn.steps_per_call == 1:  # Straight-line: no loop machinery.
            i, ok, _ = body(*start)
        else:
            i, ok, _ = tf.while_loop(cond, body, start)
        with tf.control_dependencies(self._guard(ok)):
            return tf.identity(i), self._logs()

    def _run_one(self, batch: Any) -> tf.Tensor:
        """One step: on the one device, or on every replica of the strategy.

        A multi-worker strategy feeds per-replica batches (its iterators are
        distributed, to shard the data between workers). In one process the
        global batch is split inside the graph instead, each replica taking
        an even share (the first ones one example more when it does not
        divide): the data then flows through an ordinary iterator, which
        costs less per epoch than a distributed one.
        """
        if self.strategy is None:
            return self.one(batch)
        fn = self.one if self.sharded else self._one_share
        ok = self.strategy.run(fn, args=(batch,))
        return self.strategy.experimental_local_results(ok)[0]  # the same on every replica

    def _one_share(self, batch: Any) -> tf.Tensor:
        context = tf.distribute.get_replica_context()
        replica, replicas = context.replica_id_in_sync_group, context.num_replicas_in_sync
        if replicas == 1:
            return self.one(batch)
        n = batch_size(unpack(batch)[0])
        base, extra = n // replicas, n % replicas
        start = replica * base + tf.minimum(replica, extra)
        size = base + tf.cast(replica < extra, n.dtype)
        share = tf.nest.map_structure(lambda t: t[start : start + size], batch)
        return self.one(share)

    def epoch_runner(self, iterator: Any) -> Callable[[tf.Tensor], tuple[tf.Tensor, Logs]]:
        """A caller of the iterator function bound to one iterator (one epoch).

        A `tf.function` call spends most of its time on dispatch when the
        step is small: it hashes the iterator's type (its whole element
        spec) on every call. The iterator and its signature are fixed for an
        epoch, so the runner resolves the concrete function once and then
        feeds it flat tensors. Under `run_functions_eagerly`, or inside
        another graph, it falls back to the ordinary call.
        """
        if tf.config.functions_run_eagerly() or not tf.executing_eagerly():
            return lambda limit: self.on_iterator(iterator, limit)
        concrete = self.on_iterator.get_concrete_function(iterator, tf.TensorSpec([], tf.int32))
        call_flat = getattr(concrete, "_call_flat", None)
        if call_flat is None:  # Not this TensorFlow's internals: the public path.
            return lambda limit: concrete(iterator, limit)
        inputs = tf.nest.flatten(iterator, expand_composites=True)
        captured = concrete.captured_inputs
        return lambda limit: call_flat([*inputs, limit], captured)

    def _logs(self) -> Logs:
        logs = metric_results(self.metrics)
        if self.train and self.step_fn.nonfinite == "skip":
            logs["skipped"] = tf.identity(self.skipped.value())
        return logs

    # -- recovery -------------------------------------------------------------

    def recover(self) -> None:
        """After a failed call: puts back what the failed step moved."""
        if self.guarded and bool(self.armed.numpy()):
            for s, v in zip(self.shadows, self.frozen, strict=True):
                v.assign(s)
            self.armed.assign(False)

    def explain_failure(self) -> str:
        """Says what the last non-finite step saw (read from the failure record)."""
        flags = self.bad_grads.numpy()
        bad = [v.path for v, ok in zip(self.trainable, flags, strict=True) if not ok]
        grads = (
            f"non-finite gradients of {bad}"
            if bad
            else "every gradient finite, but their sum overflowed"
            if np.isfinite(self.bad_loss.numpy())
            else "gradients not inspected past the loss"
            if self.loss_scaled
            else "every gradient finite"
        )
        return (
            f"at step {int(self.counter.numpy())} (0-based) the loss was "
            f"{float(self.bad_loss.numpy())}; {grads}"
        )
