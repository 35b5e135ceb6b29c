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
`strategy.run`). A guarded train body checks the loss and every gradient
before the optimizer runs, so on failure only the variables the forward
pass moved (BatchNorm statistics, Dropout's seed) need putting back: those
are its `rollback_variables`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

from tfpure.batch import Batch, batch_size, check_batch, unpack
from tfpure.compat import supports_no_merge_call
from tfpure.guard import variable
from tfpure.scaling import replica_objective
from tfpure.state import TrainState

if TYPE_CHECKING:
    from tfpure.spec import StepSpec

__all__ = ["EvalBody", "Logs", "TrainBody", "metric_results"]

Logs = dict[str, tf.Tensor]
"""What a step returns beside the state: log name -> scalar tensor (``tp.Logs``)."""


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

    def __init__(self, spec: StepSpec, state: TrainState):
        self.spec = spec
        self.model_loss = spec.model_loss
        self.model = state.model
        self.optimizer = state.optimizer
        self.counter = state.step
        self.skipped = state.skipped
        self.strategy = state.strategy
        self.metrics = dict(state.metrics if self.train else state.eval_metrics)
        self.trainable = list(state.model.trainable_variables)
        # Under MirroredStrategy the optimizer's gradient all-reduce goes
        # through merge_call, which cannot sit inside a replica's tf.cond.
        self.merge_free = supports_no_merge_call()

    def _losses(self, loss: tf.Tensor, x: Any) -> tuple[tf.Tensor, tf.Tensor]:
        return replica_objective(
            self.model_loss, loss, self.model.losses, x, self.strategy is not None
        )

    def _update_metrics(
        self, loss: tf.Tensor, x: Any, y: Any, y_pred: Any, sample_weight: Any
    ) -> None:
        # As Keras `fit`: the loss tracker is weighted by batch size, so an
        # epoch's loss is a per-example mean even with a ragged last batch.
        self.metrics["loss"].update_state(loss, sample_weight=batch_size(x))
        for name, metric in self.metrics.items():
            if name != "loss":
                metric.update_state(y, y_pred, sample_weight=sample_weight)

    def _check_metrics(self, y_pred: Any) -> None:
        if y_pred is None and len(self.metrics) > 1:
            raise ValueError(
                "The loss function returned y_pred=None, but the metrics "
                f"{sorted(set(self.metrics) - {'loss'})} need predictions: "
                "return (loss, y_pred)."
            )

    def merge(self, out: Any) -> tf.Tensor:
        """The step's verdict in cross-replica context: the same on every replica."""
        if self.strategy is None:
            return out
        return self.strategy.experimental_local_results(out)[0]

    def logs(self) -> Logs:
        logs = metric_results(self.metrics)
        if self.train and self.spec.nonfinite == "skip":
            logs["skipped"] = tf.identity(self.skipped.value())
        return logs


class TrainBody(_Body):
    """One training step of the tutorial's loop body, on one replica."""

    train = True

    def __init__(self, spec: StepSpec, state: TrainState):
        super().__init__(spec, state)
        self.loss_scaled = isinstance(state.optimizer, keras.optimizers.LossScaleOptimizer)
        self.rollback_variables = list(state.model.non_trainable_variables)
        if spec.nonfinite is not None:
            # What the last failed step saw; read only to explain the failure.
            self.bad_loss = variable(0.0, "tfpure_bad_loss")
            self.bad_grads = variable(tf.ones([len(self.trainable)], tf.bool), "tfpure_bad_grads")

    def one(self, batch: Batch) -> tf.Tensor:
        """One training step (on one replica); returns whether it was applied."""
        x, y, sample_weight = unpack(batch)
        check_batch(self.model, x, y, sample_weight)
        with tf.GradientTape() as tape:
            loss, y_pred = self.model_loss(self.model, batch, True)
            objective, reported = self._losses(loss, x)
            scaled = self.optimizer.scale_loss(objective)
        grads = tape.gradient(scaled, self.trainable)
        if self.spec.grad_transform is not None:
            grads = self._transform(grads)
        present = [g for g in grads if g is not None]
        if not present:
            raise ValueError(
                f"No gradient reaches any trainable variable of {self.model.name!r}: "
                "the loss does not depend on the model's weights."
            )
        self._check_metrics(y_pred)
        applied = (grads, reported, x, y, y_pred, sample_weight)
        if self.spec.nonfinite is None:  # The hand-written loop: apply whatever came out.
            return self._commit(*applied)

        total = tf.cast(reported, tf.float32)
        if not self.loss_scaled:  # LossScaleOptimizer skips overflowing steps itself.
            total += tf.add_n([tf.cast(tf.reduce_sum(g), tf.float32) for g in present])
        ok = tf.math.is_finite(total)
        if self.strategy is not None:  # every replica must take the same branch
            context = tf.distribute.get_replica_context()
            ok = tf.equal(context.all_reduce("sum", 1.0 - tf.cast(ok, tf.float32)), 0.0)
        if self.strategy is None or self.merge_free:
            return tf.cond(
                ok, lambda: self._commit(*applied), lambda: self._record(reported, grads)
            )
        return tf.distribute.get_replica_context().merge_call(
            self._cross_replica_cond, args=(ok, *applied)
        )

    def _commit(self, grads, reported, x, y, y_pred, sample_weight) -> tf.Tensor:
        self.optimizer.apply_gradients(zip(grads, self.trainable, strict=True))
        self._update_metrics(reported, x, y, y_pred, sample_weight)
        self.counter.assign_add(1)
        return tf.constant(True)

    def _record(self, loss: tf.Tensor, grads: list[Any]) -> tf.Tensor:
        """The failure branch: keeps what the step saw, for `explain_failure`."""
        self.bad_loss.assign(tf.cast(loss, tf.float32))
        flags = [
            tf.constant(True) if g is None else tf.reduce_all(tf.math.is_finite(g)) for g in grads
        ]
        self.bad_grads.assign(tf.stack(flags))
        return tf.constant(False)

    def _cross_replica_cond(
        self, strategy: Any, ok: Any, grads: Any, reported: Any, *rest: Any
    ) -> tf.Tensor:
        """The guard's branch, taken in cross-replica context (as LossScaleOptimizer does)."""
        first = strategy.experimental_local_results

        def commit() -> tf.Tensor:
            strategy.extended.call_for_each_replica(self._commit, args=(grads, reported, *rest))
            return tf.constant(True)

        def record() -> tf.Tensor:
            local = [None if g is None else first(g)[0] for g in grads]
            return self._record(first(reported)[0], local)

        return tf.cond(first(ok)[0], commit, record)

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


class EvalBody(_Body):
    """One evaluation step, on one replica: only `state.eval_metrics` change."""

    train = False

    def __init__(self, spec: StepSpec, state: TrainState):
        super().__init__(spec, state)
        self.rollback_variables: list[Any] = []

    def one(self, batch: Batch) -> tf.Tensor:
        x, y, sample_weight = unpack(batch)
        check_batch(self.model, x, y, sample_weight)
        loss, y_pred = self.model_loss(self.model, batch, False)
        _, loss = self._losses(loss, x)
        self._check_metrics(y_pred)
        # Nothing is counted unless the whole batch was scored.
        with tf.control_dependencies([loss]):
            self._update_metrics(loss, x, y, y_pred, sample_weight)
        return tf.constant(True)
