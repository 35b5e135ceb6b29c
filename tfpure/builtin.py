"""The built-in step bodies: the tutorial's loop body, for training and evaluation.

`make_train_step(loss)` and `make_eval_step(loss)` compile these bodies on the
same engine (`tfpure.graph`) as user-written `make_step` bodies:

  * train: ``GradientTape``; ``model(x, training=True)``; loss plus
    ``model.losses``; ``optimizer.scale_loss`` (mixed precision); the
    optional gradient transform; ``optimizer.apply_gradients``; metrics and
    the batch-size-weighted loss tracker updated, as Keras `fit` does;
  * eval: ``model(x, training=False)``; loss plus ``model.losses``; only
    `state.eval_metrics` change.

A body runs on one replica (the engine dispatches it through
`strategy.run`). A guarded train body runs whole, then checks the state it
left (see `TrainBody`); on failure the engine puts back the variables the
forward pass moved (`rollback_variables`: BatchNorm statistics, Dropout's
seed, shadowed) and the values of the rest (`held_variables`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

from tfpure.batch import Batch, batch_size, check_batch, unpack
from tfpure.compat import branch, supports_no_merge_call
from tfpure.distribute import replica_objective
from tfpure.guard import all_finite, finite_flags, variable
from tfpure.losses import BoundLoss, bind
from tfpure.outputs import Route, select
from tfpure.state import TrainState, variable_groups
from tfpure.types import Logs

if TYPE_CHECKING:
    from tfpure.spec import StepSpec

__all__ = ["EvalBody", "TrainBody", "metric_results"]


def metric_results(metrics: dict[str, keras.metrics.Metric]) -> Logs:
    """The current value of each metric, dict-valued results flattened as Keras does.

    Example:
      >>> import keras
      >>> from tfpure.builtin import metric_results
      >>> mean = keras.metrics.Mean(); mean.update_state([1.0, 3.0])
      >>> {k: float(v) for k, v in metric_results({"loss": mean}).items()}
      {'loss': 2.0}
    """
    logs: Logs = {}
    for name, metric in metrics.items():
        result = metric.result()
        if isinstance(result, dict):  # Keras flattens dict-valued metrics.
            logs.update(result)
        else:
            logs[name] = result
    return logs


class _Body:
    """What both built-in bodies share: one state, one loss, its metrics."""

    train: bool
    # What a step may write, for the guard (a training body sets them).
    rollback_variables: Sequence[Any] = ()
    held_variables: Sequence[Any] = ()
    also_written: Sequence[Any] = ()
    # The class count of the labels `one` met (integer class indices), once traced.
    label_classes: int | None = None

    def __init__(self, spec: StepSpec, state: TrainState):
        self.spec = spec
        self.model_loss = bind(spec.model_loss, state.model)
        # Each output's loss (Keras' `a_loss`, ...), tracked by the step for this state.
        self.loss_trackers = (
            self.model_loss.trackers if isinstance(self.model_loss, BoundLoss) else {}
        )
        self.model = state.model
        self.optimizer = state.optimizer
        self.counter = state.step
        self.skipped = state.skipped
        self.strategy = state.strategy
        self.metrics = dict(state.metrics if self.train else state.eval_metrics)
        self.routes = dict(state.routes)
        self.trainable = list(state.model.trainable_variables)
        # Under MirroredStrategy the optimizer's gradient all-reduce goes
        # through merge_call, which cannot sit inside a replica's tf.cond.
        self.merge_free = supports_no_merge_call()

    def _losses(self, loss: tf.Tensor, x: Any) -> tuple[tf.Tensor, tf.Tensor]:
        return replica_objective(
            self.model_loss, loss, self.model.losses, x, self.strategy is not None
        )

    def _forward(self, batch: Batch, training: bool) -> tuple[Any, Any, list[Any]]:
        """The loss, the predictions and each output's loss (empty for one output)."""
        if self.loss_trackers:
            return self.model_loss.split(self.model, batch, training)
        loss, y_pred = self.model_loss(self.model, batch, training)
        return loss, y_pred, []

    def _update_metrics(
        self, loss: tf.Tensor, x: Any, y: Any, y_pred: Any, sample_weight: Any, parts: list[Any]
    ) -> None:
        # As Keras `fit`: the loss tracker is weighted by batch size, so an
        # epoch's loss is a per-example mean even with a ragged last batch.
        self.metrics["loss"].update_state(loss, sample_weight=batch_size(x))
        for name, metric in self.metrics.items():
            if name == "loss":
                continue
            route = self.routes.get(name)
            if route is None:  # a metric of the whole targets, sample weights included
                route = Route(weighted=True)
            weights = select(sample_weight, route) if route.weighted else None
            try:
                metric.update_state(select(y, route), select(y_pred, route), sample_weight=weights)
            except (TypeError, ValueError) as err:
                if route.output is not None or not isinstance(y_pred, dict | list | tuple):
                    raise
                raise type(err)(
                    f"Metric {name!r} got every output of model {self.model.name!r} at once "
                    f"and failed: {err}. Give it one output, keyed by output name: "
                    f"TrainState.create(metrics={{'<output>': ...}})."
                ) from err
        if parts:
            self.model_loss.track(parts, y_pred)

    def _checked(self, batch: Batch) -> tuple[Batch, Any, Any, Any]:
        """The batch and its parts, checked against the model (`check_batch`)."""
        x, y, sample_weight = unpack(batch)
        checked = check_batch(self.model, x, y, sample_weight)
        if checked is not x:  # waits on a run-time check of its feature sizes
            x, batch = checked, (checked, y, sample_weight)
        return batch, x, y, sample_weight

    def _note_labels(self, y: Any, y_pred: Any) -> None:
        """Notes, while tracing, the class count of integer labels one rank below the
        predictions (class indices: sparse crossentropy, sparse accuracy)."""
        if not isinstance(y_pred, tf.Tensor) or not isinstance(y, tf.Tensor | np.ndarray):
            return
        classes, rank = y_pred.shape[-1] if y_pred.shape.rank else None, y_pred.shape.rank
        if not tf.as_dtype(y.dtype).is_integer or classes is None or classes < 2:
            return
        shape = tf.TensorShape(y.shape)
        if shape.rank == rank - 1 or (shape.rank == rank and shape[-1] == 1):
            self.label_classes = classes

    def label_checks(self, batch: Any) -> list[Any]:
        """Under XLA: an assertion that every label is a class of the model's (noted when
        `one` was traced), naming the labels out of range and the class count."""
        classes = self.label_classes
        if classes is None:
            return []
        _, y, _ = unpack(batch)
        y = tf.convert_to_tensor(y)
        bad = tf.logical_or(y < 0, y >= classes)
        return [
            tf.debugging.Assert(
                tf.logical_not(tf.reduce_any(bad)),
                [
                    f"A label is out of range: the model {self.model.name} has {classes} "
                    f"classes, so labels must be in [0, {classes}); the batch holds the "
                    "labels",
                    tf.boolean_mask(y, bad),
                    "(a data error; nothing of the batch was applied)",
                ],
                summarize=10,
            )
        ]

    def _check_metrics(self, y_pred: Any) -> None:
        if y_pred is None and len(self.metrics) > 1:
            raise ValueError(
                "The loss function returned y_pred=None, but the metrics "
                f"{sorted(set(self.metrics) - {'loss'})} need predictions: "
                "return (loss, y_pred)."
            )

    def merge(self, out: Any, record: bool = True) -> tuple[tf.Tensor, tf.Tensor]:
        """The verdict in cross-replica context, the same on every replica: (keep, no failure)."""
        ok = out if self.strategy is None else self.strategy.experimental_local_results(out)[0]
        return ok, ok

    def logs(self) -> Logs:
        logs = {**metric_results(self.metrics), **metric_results(self.loss_trackers)}
        if self.train and self.spec.nonfinite == "skip":
            logs["skipped"] = tf.identity(self.skipped.value())
        return logs


class TrainBody(_Body):
    """One training step of the tutorial's loop body, on one replica.

    Guarded, the step runs whole (update, metrics, counters), then checks
    the state it left: the loss and every floating variable of the model and
    the optimizer (weights, slots, BatchNorm statistics) finite. A failed
    check puts every variable back (`Rollback`), a `LossScaleOptimizer`'s
    loss scale and its counter included. A step the optimizer skipped for
    overflowing gradients (the loss and every variable finite) is put back
    too, without an error, but keeps the lowered scale: that is how the
    optimizer finds its scale.
    """

    train = True

    def __init__(self, spec: StepSpec, state: TrainState):
        if state.optimizer is None:
            raise ValueError(
                f"make_train_step trains the state's model {state.model.name!r} with its "
                "optimizer, but the state has none (TrainState.create(..., optimizer=None)"
                "): create it with an optimizer, or evaluate it with make_eval_step."
            )
        super().__init__(spec, state)
        optimizer = state.optimizer
        self.loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        own = {id(optimizer.dynamic_scale), id(optimizer.step_counter)} if self.loss_scaled else ()
        groups = variable_groups(state)
        # What the forward pass moves (BatchNorm statistics, Dropout's seed) gets
        # shadows; the rest is held for the step (see `Rollback`).
        self.rollback_variables = list(state.model.non_trainable_variables)
        moved = {id(v) for v in self.rollback_variables}
        self.held_variables = [
            v
            for group in ("model", "optimizer", "metrics", "counters")
            for v in groups[group]
            if id(v) not in own and id(v) not in moved
        ] + [v for tracker in self.loss_trackers.values() for v in tracker.variables]
        self.checked = [v for v in [*groups["model"], *groups["optimizer"]] if id(v) not in own]
        # What a step writes beyond what `Rollback` covers: put back when a call is replayed.
        self.also_written = (
            [optimizer.dynamic_scale, optimizer.step_counter] if self.loss_scaled else []
        )
        if spec.nonfinite is not None:
            # What the last failed step saw, per local replica; read only to explain it.
            s = self.strategy
            r = self.replicas = 1 if s is None else len(s.extended.worker_devices)
            self.bad_loss = variable(tf.zeros([r]), "tfpure_bad_loss")
            self.bad_examples = variable(tf.zeros([r], tf.int64), "tfpure_bad_examples")
            self.bad_grads = variable(tf.ones([r, len(self.trainable)], bool), "tfpure_bad_grads")
            self.bad_vars = variable(tf.ones([r, len(self.checked)], bool), "tfpure_bad_vars")

    def one(self, batch: Batch, judge: bool = True, ordered: bool = True) -> Any:
        """One training step (on one replica); guarded, returns what `merge` judges.

        Not `judge`: a step of a call judged at its end, which checks only that its batch
        held examples and a loss scale's overflow: its loss stays in the loss tracker's
        sum, and `verdict` judges it with the variables once the call ran. Not `ordered`:
        the updates do not wait for the forward pass to run whole (a step of a `Window`
        or a `Fused` call, which put every variable back after a run-time error).
        """
        batch, x, y, sample_weight = self._checked(batch)
        with tf.GradientTape() as tape:
            loss, y_pred, parts = self._forward(batch, True)
            self._note_labels(y, y_pred)
            objective, reported = self._losses(loss, x)
            scaled = self.optimizer.scale_loss(objective)
        grads = tape.gradient(scaled, self.trainable)
        if self.spec.grad_transform is not None:
            grads = self._transform(grads)
        if all(g is None for g in grads):
            raise ValueError(
                f"No gradient reaches any trainable variable of {self.model.name!r}: "
                "the loss does not depend on the model's weights."
            )
        self._check_metrics(y_pred)
        if self.spec.nonfinite is None:  # The hand-written loop: apply whatever came out.
            return self._commit(grads, reported, x, y, y_pred, sample_weight, parts)
        # Nothing is written before the forward pass ran whole: a run-time error there (a
        # label out of range) leaves the held variables as they were. The updates wait for
        # the loss and the predictions, not for every gradient: the last layers' updates
        # then overlap the backward pass of the first ones, as in the unguarded step
        # (waiting for every gradient cost 5-9% of a guarded plain-graph step, paired).
        scale = counter = None
        if self.loss_scaled:
            scale = tf.identity(self.optimizer.dynamic_scale)
            counter = tf.identity(self.optimizer.step_counter)
        predicted = [p for p in tf.nest.flatten(y_pred) if p is not None]
        ran = [reported, *predicted] + ([] if scale is None else [scale])
        with tf.control_dependencies([tf.group(ran)] if ordered else []):  # one edge for all
            self._commit(grads, reported, x, y, y_pred, sample_weight, parts)
        # Reads after the update (automatic control dependencies order them).
        examples = tf.cast(batch_size(x), tf.int64)
        overflow = tf.constant(False) if scale is None else self.optimizer.dynamic_scale < scale
        if not judge:  # the loss and the variables judged once the call ran (`verdict`)
            failed = tf.cast(tf.equal(examples, 0), tf.int32)
            return failed, overflow, None, examples, None, grads, (scale, counter)
        reported = tf.cast(reported, tf.float32)
        left = finite_flags(self.checked)
        fine = tf.logical_and(tf.math.is_finite(reported), tf.reduce_all(left))
        if self.strategy is None:  # (a replica's share may be empty, the batch not)
            fine = tf.logical_and(fine, examples > 0)
        failed = tf.cast(tf.logical_not(fine), tf.int32)
        return failed, overflow, reported, examples, left, grads, (scale, counter)

    def _commit(self, grads, reported, x, y, y_pred, sample_weight, parts) -> tf.Tensor:
        self.optimizer.apply_gradients(zip(grads, self.trainable, strict=True))
        self._update_metrics(reported, x, y, y_pred, sample_weight, parts)
        self.counter.assign_add(1)
        return tf.constant(True)

    def merge(self, out: Any, record: bool = True) -> tuple[tf.Tensor, tf.Tensor]:
        """The verdict in cross-replica context: (keep the step, no failure).

        A failure is recorded to explain it, unless `record` is False (a step
        that is replayed if it is not kept).
        """
        if self.spec.nonfinite is None:
            return super().merge(out)
        failures, overflow, loss, examples, left, grads, scale_before = out
        s = self.strategy
        local = (lambda v: [v]) if s is None else s.experimental_local_results
        if s is not None:  # every worker takes the same branch
            failures = s.reduce(tf.distribute.ReduceOp.SUM, failures, axis=None)
        no_failure = tf.equal(failures, 0)
        if self.loss_scaled:  # a failed step lowers no scale (an overflow alone does)
            for v, before in zip(self.also_written, scale_before, strict=True):
                v.assign(tf.where(no_failure, tf.convert_to_tensor(v), local(before)[0]))

        def record_failure() -> tf.Tensor:
            per_replica = [local(g) if g is not None else [None] * self.replicas for g in grads]
            gradient_flags = [
                finite_flags([g[r] for g in per_replica]) for r in range(self.replicas)
            ]
            self.bad_loss.assign(tf.stack(local(loss)))
            self.bad_examples.assign(tf.stack(local(examples)))
            self.bad_grads.assign(tf.stack(gradient_flags))
            self.bad_vars.assign(tf.stack(local(left)))
            return tf.constant(False)

        if record:
            no_failure = branch(no_failure, lambda: tf.constant(True), record_failure, s is None)
        return tf.logical_and(no_failure, tf.logical_not(local(overflow)[0])), no_failure

    def verdict(self) -> tf.Tensor:
        """Whether the state a call judged at its end left is finite: every variable a
        step checks (weights, slots, BatchNorm statistics) and the loss trackers, whose
        sums keep a non-finite loss of any step of the call."""
        trackers = [self.metrics["loss"], *self.loss_trackers.values()]
        return all_finite([*self.checked, *(v for t in trackers for v in t.variables)])

    def on_skip(self) -> list[Any]:
        """What a skipped batch counts (cross-replica context)."""
        return [self.counter.assign_add(1), self.skipped.assign_add(1)]

    def _transform(self, grads: list[Any]) -> list[Any]:
        transform = self.spec.grad_transform
        if not self.loss_scaled:
            return list(transform(list(grads), self.trainable))
        # The transform sees true gradients; LossScaleOptimizer unscales later.
        scale = self.optimizer.dynamic_scale
        unscaled = [None if g is None else g / scale for g in grads]
        return [None if g is None else g * scale for g in transform(unscaled, self.trainable)]

    def logs(self) -> Logs:
        logs = super().logs()
        if self.spec.nonfinite == "skip":  # an epoch of skipped batches measured nothing
            measured = self.metrics["loss"].count > 0
            nan = tf.constant(float("nan"))
            logs = {k: v if k == "skipped" else tf.where(measured, v, nan) for k, v in logs.items()}
        return logs

    def explain_failure(self) -> str:
        """Says what the last failed step saw (read from the failure record).

        Under a strategy the gradients of each replica are its own (before
        the all-reduce): the replica whose shard went wrong is named.
        """
        losses, grads, after = (v.numpy() for v in (self.bad_loss, self.bad_grads, self.bad_vars))
        step = int(self.counter.numpy())
        bad = [_names(self.trainable, flags) for flags in grads]
        left = _names(self.checked, np.all(after, axis=0))
        if self.replicas == 1:
            if int(self.bad_examples.numpy()[0]) == 0:
                return (
                    f"at step {step} (0-based) the batch had no examples (the loss of none is "
                    f"{float(losses[0])}): filter empty batches out of the data"
                )
            seen = (
                f"non-finite gradients of {bad[0]}"
                if bad[0]
                else f"every gradient finite, but the step left non-finite values in {left}"
                if left
                else "every gradient and variable finite"
            )
            return f"at step {step} (0-based) the loss was {float(losses[0])}; {seen}"
        by_replica = [f"replica {r}: non-finite gradients of {b}" for r, b in enumerate(bad) if b]
        seen = (
            "; ".join(by_replica) + " (the other replicas' own gradients finite)"
            if by_replica
            else f"every replica's gradients finite, but the step left non-finite values in {left}"
            if left
            else "every gradient and variable finite"
        )
        losses = [float(v) for v in losses]
        return f"at step {step} (0-based) the replicas' losses were {losses}; {seen}"


def _names(variables: list[Any], finite: Any, shown: int = 6) -> str:
    """The paths of the variables not `finite`, the first few of a long list."""
    paths = [v.path for v, ok in zip(variables, finite, strict=True) if not ok]
    if len(paths) > shown:
        return f"{paths[: shown - 1]} and {len(paths) - shown + 1} more"
    return str(paths) if paths else ""


class EvalBody(_Body):
    """One evaluation step, on one replica: only `state.eval_metrics` change."""

    train = False

    def one(self, batch: Batch, judge: bool = True, ordered: bool = True) -> tf.Tensor:
        """One evaluation step (on one replica); `judge`, `ordered` unused: nothing is
        guarded."""
        batch, x, y, sample_weight = self._checked(batch)
        loss, y_pred, parts = self._forward(batch, False)
        self._note_labels(y, y_pred)
        _, loss = self._losses(loss, x)
        self._check_metrics(y_pred)
        # Nothing is counted unless the whole batch was scored.
        with tf.control_dependencies([loss]):
            self._update_metrics(loss, x, y, y_pred, sample_weight, parts)
        return tf.constant(True)
