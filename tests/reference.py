"""The tutorial's hand-written training loop: the independent reference.

Kept as the tutorial writes it (GradientTape, `training=True`, loss plus
`model.losses`, `apply_gradients`, metric `update_state`/`reset_state`), with
no tfpure code, so that tests compare tfpure against it.
"""

import keras
import tensorflow as tf


def tutorial_train_step(
    model, optimizer, loss_fn, train_loss_metric, train_accuracy_metric, input_signature=None
):
    """The tutorial's step. `input_signature` (not in the tutorial) lets a test trace it
    with the batch dimension free, as tfpure traces its steps: the same graph then."""

    @tf.function(input_signature=input_signature)
    def train_step(x_batch, y_batch):
        with tf.GradientTape() as tape:
            predictions = model(x_batch, training=True)
            loss = loss_fn(y_batch, predictions)
            # Add regularization losses, if any.
            loss += sum(model.losses)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        train_loss_metric.update_state(loss)
        train_accuracy_metric.update_state(y_batch, predictions)

    return train_step


def tutorial_fit(model, optimizer, loss_fn, train_dataset, epochs):
    """The tutorial's epoch loop; returns per-epoch (loss, accuracy)."""
    train_loss_metric = keras.metrics.Mean(name="train_loss")
    train_accuracy_metric = keras.metrics.SparseCategoricalAccuracy(name="train_accuracy")
    train_step = tutorial_train_step(
        model, optimizer, loss_fn, train_loss_metric, train_accuracy_metric
    )
    history = []
    for _epoch in range(epochs):
        train_loss_metric.reset_state()
        train_accuracy_metric.reset_state()
        for x_batch_train, y_batch_train in train_dataset:
            train_step(x_batch_train, y_batch_train)
        history.append((float(train_loss_metric.result()), float(train_accuracy_metric.result())))
    return history


def twin(model):
    """An identically initialised copy: same weights, statistics and seeds."""
    copy = keras.models.clone_model(model)
    for source, target in zip(model.variables, copy.variables, strict=True):
        target.assign(source)
    return copy


def preempted_after(steps, monkeypatch):
    """A callback counting training calls; after the `steps`-th, a checkpointed run sees a
    SIGTERM (none is sent) and saves and raises `tp.Preempted`. `monkeypatch.undo()` ends it."""
    from tfpure import resume

    calls = []

    class Count(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            calls.append(batch)

    preempted = property(lambda self: len(calls) == steps, lambda self, value: None)
    monkeypatch.setattr(resume.Run, "preempted", preempted, raising=False)
    return Count()


def documented_shuffle(arrays, seed):
    """The examples of `arrays` in the order `tfpure.arrays` documents for ``shuffle=seed``,
    one by one (batch them to compare): each pass draws ``r`` from ``Dataset.random(seed)``
    and takes ``stateless_shuffle(range(n), seed=[r, 0])``. Its draws depend on the global
    seed, as the arrays' do: set it alike before building both."""
    n = int(tf.nest.flatten(arrays)[0].shape[0])

    def epoch(r):
        seed = tf.stack([r, tf.constant(0, tf.int64)])
        order = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64), seed)
        return tf.data.Dataset.from_tensor_slices(order).map(
            lambda i: tf.nest.map_structure(lambda a: tf.gather(a, i), arrays)
        )

    draws = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).take(1)
    return draws.flat_map(epoch)
