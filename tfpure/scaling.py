"""Per-replica loss scaling: what each replica differentiates so the sum is exact.

Under a `tf.distribute` strategy each replica computes gradients on its
share of the global batch, and the optimizer sums them. For that sum to
equal the single-device gradient, each replica must differentiate its
*contribution* to the global loss, not its own mean. `replica_objective`
computes that contribution for a built-in step's loss.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from tfpure.distribute import batch_size

__all__ = ["replica_objective"]


def replica_objective(
    model_loss: Any, loss: tf.Tensor, extra: list[tf.Tensor], x: Any, distributed: bool
) -> tuple[tf.Tensor, tf.Tensor]:
    """The loss to differentiate, and the loss to report, from a model loss.

    Args:
      model_loss: the full-control loss function (its `replica_scaled` and
        `per_example_mean` attributes say how Keras reduced it).
      loss: its value on this replica's share.
      extra: the model's regularization losses (``model.losses``).
      x: this replica's features (to count its examples).
      distributed: whether the step runs under a strategy.

    On one device both are ``loss + sum(model.losses)``, as in the tutorial
    and Keras `fit`. On R replicas: Keras losses arrive divided by R; a
    per-example mean is instead weighted by the replica's share of the
    examples (exact when the last batch splits unevenly), and regularization
    is divided by R (counted once). The reported loss is the replica's own
    mean plus the regularization, which the batch-size-weighted tracker
    averages.

    Example:
      >>> import tensorflow as tf
      >>> from tfpure.scaling import replica_objective
      >>> objective, reported = replica_objective(None, tf.constant(2.0), [tf.constant(0.5)],
      ...                                         tf.ones((4, 1)), distributed=False)
      >>> float(objective), float(reported)
      (2.5, 2.5)
    """
    context = tf.distribute.get_replica_context()
    replicas = context.num_replicas_in_sync if distributed else 1
    if replicas == 1:
        total = loss + sum(extra) if extra else loss
        return total, total
    regularization = sum(extra) if extra else tf.zeros_like(loss)
    mean = loss * replicas if getattr(model_loss, "replica_scaled", True) else loss
    if getattr(model_loss, "per_example_mean", False):
        n = tf.cast(batch_size(x), loss.dtype)
        objective = mean * n / context.all_reduce("sum", n)
    else:
        objective = loss
    return objective + regularization / replicas, mean + regularization
