"""Distribution helpers: where a state's strategy runs, and how a batch is split.

Steps, loops and checkpoints ask the same questions of a `tf.distribute`
strategy: does it span several processes (`cluster_task`), which strategy do
all the states of a step share (`strategy_of`), which share of a global batch
does this replica train on (`replica_share`), and what loss it differentiates
so that the replicas' gradients sum to the one device's (`replica_objective`).

Inside a user-written step body (`tp.make_step`), each replica sees its share
of the global batch. Logs and losses follow Keras' convention: a replica
returns its *contribution*, and the contributions are summed. Keras loss
objects already divide their mean by the number of replicas; a hand-written
mean should use `replica_mean`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import tensorflow as tf

from tfpure.batch import batch_size

__all__ = [
    "Task",
    "cluster_task",
    "replica_mean",
    "replica_objective",
    "replica_share",
    "strategy_of",
]


@attrs.frozen
class Task:
    """This process's place in a multi-worker cluster.

    Example:
      >>> from tfpure.distribute import Task
      >>> Task("worker", 1, chief=False).name
      'worker-1'
    """

    task_type: str
    task_id: int
    chief: bool

    @property
    def name(self) -> str:
        return f"{self.task_type}-{self.task_id}"


def cluster_task(strategy: tf.distribute.Strategy | None) -> Task | None:
    """This process's task if `strategy` spans several processes, else None.

    The chief is the task of type ``chief``, or worker 0 when there is none
    (TensorFlow's convention).

    Example:
      >>> import tensorflow as tf
      >>> from tfpure.distribute import cluster_task
      >>> print(cluster_task(None), cluster_task(tf.distribute.OneDeviceStrategy("/cpu:0")))
      None None
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return None
    cluster = resolver.cluster_spec().as_dict()
    if sum(len(tasks) for tasks in cluster.values()) <= 1:
        return None
    chief = resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in cluster
    )
    return Task(resolver.task_type, int(resolver.task_id), chief)


def strategy_of(states: Sequence[Any]) -> tf.distribute.Strategy | None:
    """The strategy every state in `states` was created under (or None for none).

    Raises:
      ValueError: the states were created under different strategies.

    Example:
      >>> import keras, tfpure as tp
      >>> from tfpure.distribute import strategy_of
      >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
      >>> print(strategy_of([tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())]))
      None
    """
    strategies = {id(s.strategy): s.strategy for s in states}
    if len(strategies) > 1:
        names = [type(s.strategy).__name__ if s.strategy else "None" for s in states]
        raise ValueError(
            "The states of one step must all be created under the same tf.distribute "
            f"strategy (in one `with strategy.scope():` block); got {names}."
        )
    return next(iter(strategies.values())) if strategies else None


def replica_share(batch: Any) -> Any:
    """This replica's share of a global batch (call in a replica context).

    Each replica takes an even share, the first ones one example more when
    the batch does not divide (a ragged last batch).

    Example:
      >>> import tensorflow as tf
      >>> from tfpure.distribute import replica_share
      >>> replica_share(tf.range(5)).numpy().tolist()  # no strategy: the whole batch
      [0, 1, 2, 3, 4]
    """
    context = tf.distribute.get_replica_context()
    replica, replicas = context.replica_id_in_sync_group, context.num_replicas_in_sync
    if replicas == 1:
        return batch
    n = batch_size(batch)
    base, extra = n // replicas, n % replicas
    start = replica * base + tf.minimum(replica, extra)
    size = base + tf.cast(replica < extra, n.dtype)
    return tf.nest.map_structure(lambda t: t[start : start + size], batch)


def replica_mean(values: tf.Tensor) -> tf.Tensor:
    """A per-example mean over the *global* batch, as this replica's contribution.

    In a user-written step body under a strategy, each replica sees a share
    of the batch; gradients and logs are summed over replicas. For a loss
    written by hand as a mean, ``tf.reduce_mean(values)`` would count each
    replica's mean once per replica; ``replica_mean(values)`` divides the
    replica's sum by the global number of examples instead (exact for a
    ragged last batch too). With no strategy it is ``tf.reduce_mean``.

    Example:
      >>> import tensorflow as tf
      >>> from tfpure.distribute import replica_mean
      >>> float(replica_mean(tf.constant([1.0, 2.0, 6.0])))
      3.0
    """
    values = tf.convert_to_tensor(values)
    total = tf.reduce_sum(values)
    n = tf.cast(tf.size(values), total.dtype)
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        n = context.all_reduce("sum", n)
    return total / n


# -- per-replica loss scaling: what each replica differentiates so the sum is exact ---
#
# Under a `tf.distribute` strategy each replica computes gradients on its share of
# the global batch, and the optimizer sums them. For that sum to equal the
# single-device gradient, each replica must differentiate its *contribution* to the
# global loss, not its own mean. `replica_objective` computes that contribution for
# a built-in step's loss.


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
      >>> from tfpure.distribute import replica_objective
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
