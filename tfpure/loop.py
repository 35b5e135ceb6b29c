"""Loops: `fold` (one pass), `evaluate`, and `fit_loop` (epochs with callbacks).

The loop is a fold of a step over batches, nested in a fold over epochs,
exactly the tutorial's two `for` loops: reset the metrics, run the batches,
validate with ``training=False``, report. `fit_loop` drives ordinary Keras
callbacks through `keras.callbacks.CallbackList`, the object Keras' own `fit`
uses, so progress bars, `History`, `EarlyStopping`, `CSVLogger` and
`TensorBoard` behave as under `fit`.

Data is a `tf.data.Dataset` (the fast path: batches are pulled inside the
graph, `steps_per_call` at a time) or any iterable of batches (one Python call
per batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras

from tfpure.builtin import Logs, metric_results
from tfpure.checkpoint import Checkpointer
from tfpure.passes import (
    LogsHook,
    batch_hooks,
    callback_list,
    check_data,
    data_iterator,
    num_batches,
    prepare,
    retire,
    run_pass,
)
from tfpure.resume import Run
from tfpure.state import leaves
from tfpure.steps import Step, StepFn, make_eval_step

__all__ = ["evaluate", "fit_loop", "fold"]


def fold(step: StepFn, state: Any, batches: Any) -> tuple[Any, Logs]:
    """One pass of `step` over `batches`: ``for b in batches: state, logs = step(state, b)``.

    No metric is reset and no callback runs: `fold` is the bare loop, for
    research code that composes its own. `step` may be any `StepFn`,
    including a plain Python function over several states.

    Args:
      step: a step, e.g. from `make_train_step`.
      state: a `TrainState` (or, for a user-written step, whatever it threads).
      batches: a `tf.data.Dataset` or an iterable of batches.

    Returns:
      ``(state, logs)``, the logs of the last step (running metric values).

    Raises:
      ValueError: `batches` held no batch.

    Example:
      >>> import keras, tensorflow as tf, tfpure as tp
      >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
      >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD(0.01))
      >>> data = tf.data.Dataset.from_tensor_slices((tf.ones((10, 3)), tf.ones((10, 1)))).batch(4)
      >>> state, logs = tp.fold(tp.make_train_step("mse"), state, data)
      >>> int(state.step), sorted(logs)
      (3, ['loss'])
    """
    check_data(batches, "batches")
    state, logs, done = run_pass(step, state, batches)
    if not done or logs is None:
        raise ValueError("`batches` held no batch: there was nothing to fold over.")
    return state, logs


def floats(logs: Logs) -> dict[str, float]:
    return {name: float(value) for name, value in logs.items()}


def current_logs(step: StepFn, state: Any) -> Logs:
    """The running figures a step would report now, without running it."""
    if isinstance(step, Step):
        return step.results(state)
    return metric_results(leaves(state)[0].metrics)


def reset(step: StepFn, state: Any, *, train: bool) -> None:
    """Starts an epoch's (or an evaluation's) running figures afresh, for every state."""
    for s in leaves(state):
        s.reset_metrics() if train else s.reset_eval_metrics()
    if isinstance(step, Step):
        step.reset_logs(state)


def _eval_step_for(eval_step: StepFn | None, train_step: StepFn) -> StepFn:
    if eval_step is not None:
        if isinstance(eval_step, Step) and eval_step.kind == "train":
            raise ValueError("`eval_step` is a training step; build it with make_eval_step(loss).")
        return eval_step
    if isinstance(train_step, Step) and train_step.kind == "train":
        return make_eval_step(
            train_step.loss,
            jit_compile=train_step.jit_compile,
            steps_per_call=train_step.steps_per_call,
        )
    raise ValueError(
        "`val_data` needs an `eval_step` when `train_step` is not built by make_train_step "
        "(a make_step body, or a plain function): pass eval_step=."
    )


def evaluate(
    state: Any,
    data: Any,
    eval_step: StepFn,
    *,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    verbose: int = 0,
) -> dict[str, float]:
    """Scores `state` on `data`: resets `state.eval_metrics`, runs `eval_step`, reports.

    `state` may be a structure of states when `eval_step` is a `make_step`
    body; its report is then each log's mean over `data`, weighted by batch size.

    The figures equal Keras' `model.evaluate` for the same model, loss and
    data: the loss is a per-example mean including ``model.losses``.

    Args:
      state: the state to score; only its eval metrics change.
      data: a `tf.data.Dataset` or an iterable of batches.
      eval_step: a step from `make_eval_step` (or any `StepFn`).
      callbacks: Keras callbacks; their ``on_test_*`` hooks run.
      verbose: 1 shows Keras' progress bar.

    Returns:
      ``{"loss": ..., <metric>: ...}`` as Python floats.

    Raises:
      ValueError: `data` held no batch.

    Example:
      >>> import keras, numpy as np, tensorflow as tf, tfpure as tp
      >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, use_bias=False)])
      >>> model.set_weights([np.ones((2, 1), "float32")])
      >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())
      >>> data = tf.data.Dataset.from_tensor_slices((tf.ones((5, 2)), tf.zeros((5, 1)))).batch(2)
      >>> tp.evaluate(state, data, tp.make_eval_step("mse"))
      {'loss': 4.0}
    """
    check_data(data, "data")
    if isinstance(eval_step, Step) and eval_step.kind == "train":
        raise ValueError("`eval_step` is a training step; build it with make_eval_step.")
    prepare(eval_step, state, data)
    cbs = callback_list(
        callbacks,
        leaves(state)[0].model,
        add_progbar=verbose != 0,
        verbose=verbose,
        epochs=1,
        steps=num_batches(data),
    )
    return _evaluate(state, data, eval_step, cbs)


def _evaluate(
    state: Any,
    data: Any,
    eval_step: StepFn,
    cbs: keras.callbacks.CallbackList,
) -> dict[str, float]:
    reset(eval_step, state, train=False)
    cbs.on_test_begin()
    state, logs, done = run_pass(
        eval_step,
        state,
        data,
        hooks=batch_hooks(cbs, "test"),
    )
    if not done or logs is None:
        raise ValueError("The evaluation data held no batch.")
    result = floats(logs)
    cbs.on_test_end(result)
    return result


def fit_loop(
    state: Any,
    data: Any,
    train_step: StepFn,
    *,
    epochs: int = 1,
    eval_step: StepFn | None = None,
    val_data: Any = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    verbose: int = 1,
    steps_per_epoch: int | None = None,
    checkpoint: Checkpointer | None = None,
) -> tuple[Any, dict[str, list[float]]]:
    """Trains for `epochs` epochs with validation and Keras callbacks; returns the history.

    Each epoch resets `state.metrics`, runs `train_step` over `data` (a fold),
    then, if `val_data` is given, runs `evaluate` and adds its figures with a
    ``val_`` prefix. Callbacks run through `keras.callbacks.CallbackList` as
    under Keras `fit`: a progress bar when ``verbose=1``, `History`, and any
    callback you pass. A callback that sets ``model.stop_training = True``
    (`EarlyStopping`) ends training after the current batch.

    When the step fuses k steps per graph call (``make_train_step(...,
    steps_per_call=k)``, a step option), a callback's batch hooks fire once per
    call (as with Keras ``steps_per_execution``), with the index of the last
    batch in the call.

    `state` may be a structure of states (a dict, tuple or list of
    `TrainState`s) when `train_step` is a `make_step` body; `history` then
    holds each log's epoch mean, and callbacks see the first state's model.

    If the model has no `optimizer` attribute (it was never compiled), it is
    set to `state.optimizer` so callbacks that read it (`ReduceLROnPlateau`,
    `LearningRateScheduler`) work.

    Args:
      state: the state to train.
      data: a `tf.data.Dataset` or an iterable of batches. A new pass starts
        each epoch (so a shuffled dataset reshuffles).
      train_step: a step from `make_train_step` or any `StepFn`.
      epochs: number of epochs, >= 1.
      eval_step: the validation step; by default `make_eval_step` of the
        training loss.
      val_data: validation batches, run after each epoch.
      callbacks: Keras callbacks.
      verbose: 0 silent, 1 progress bar, 2 one line per epoch (as in Keras).
      steps_per_epoch: if given, each epoch runs this many steps from one
        iterator kept across epochs (needed for a repeating dataset).
      checkpoint: a `Checkpointer`. `fit_loop` then restores the newest good
        checkpoint and resumes at its exact step, saves as the checkpointer
        says, and on SIGTERM finishes the current call, saves and raises
        `Preempted`. `data` must be a `tf.data.Dataset` whose epoch length is
        known (its cardinality, or `steps_per_epoch`); it is read through
        one iterator over ``data.repeat()`` so its position is saved too.

    Returns:
      ``(state, history)`` where ``history`` maps Keras log names (`loss`,
      `accuracy`, `val_loss`, ...) to one float per epoch.

    Raises:
      ValueError: `epochs` < 1, empty or infinite data, wrong kind of step.
      TypeError: `data` is not a dataset or iterable of batches.
      CheckpointError: with `checkpoint`, no checkpoint fits the state, or the
        data cannot be replayed to a saved position. Nothing changed.
      Preempted: with `checkpoint`, SIGTERM arrived; the run saved and should
        end (a `SystemExit` with code 143).
      NonFiniteError: a ``nonfinite="raise"`` step met a non-finite value.

    Example:
      >>> import keras, numpy as np, tensorflow as tf, tfpure as tp
      >>> keras.utils.set_random_seed(1)
      >>> x = np.random.normal(size=(64, 2)).astype("float32"); y = (x[:, 0] > 0).astype("int32")
      >>> data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
      >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
      >>> state = tp.TrainState.create(
      ...     model=model, optimizer=keras.optimizers.Adam(0.1),
      ...     metrics={"accuracy": keras.metrics.SparseCategoricalAccuracy()})
      >>> loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
      >>> state, history = tp.fit_loop(state, data, tp.make_train_step(loss), epochs=3,
      ...                              val_data=data, verbose=0)
      >>> sorted(history), len(history["loss"])
      (['accuracy', 'loss', 'val_accuracy', 'val_loss'], 3)
      >>> history["val_accuracy"][-1] > 0.9
      True
    """
    leaves(state)  # a TrainState or a structure of them, or a TypeError
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"`epochs` must be an int >= 1; got {epochs!r}.")
    if isinstance(train_step, Step) and train_step.kind == "eval":
        raise ValueError("`train_step` is an evaluation step; build it with make_train_step(loss).")
    if not callable(train_step):
        raise TypeError(f"`train_step` must be callable; got {train_step!r}.")
    if steps_per_epoch is not None and (
        isinstance(steps_per_epoch, bool)
        or not isinstance(steps_per_epoch, int)
        or steps_per_epoch < 1
    ):
        raise ValueError(f"`steps_per_epoch` must be None or an int >= 1; got {steps_per_epoch!r}.")
    if steps_per_epoch is None:
        check_data(data, "data")
    if val_data is not None:
        check_data(val_data, "val_data")
        eval_step = _eval_step_for(eval_step, train_step)

    if checkpoint is not None and not isinstance(checkpoint, Checkpointer):
        raise TypeError(f"`checkpoint` must be a tp.Checkpointer; got {type(checkpoint).__name__}.")
    prepare(train_step, state, data)
    if val_data is not None:
        prepare(eval_step, state, val_data)

    run = None
    if checkpoint is not None:
        run = Run(
            checkpoint,
            state,
            data,
            steps_per_epoch,
            lambda d: data_iterator(train_step, state, d),
            extra=train_step.log_variables(state) if isinstance(train_step, Step) else [],
        )
    try:
        return _fit(
            state,
            data,
            train_step,
            epochs,
            eval_step,
            val_data,
            callbacks,
            verbose,
            steps_per_epoch,
            run,
        )
    finally:
        if run is not None:
            run.close()


def _fit(
    state: Any,
    data: Any,
    train_step: StepFn,
    epochs: int,
    eval_step: StepFn | None,
    val_data: Any,
    callbacks: Sequence[keras.callbacks.Callback],
    verbose: int,
    steps_per_epoch: int | None,
    run: Run | None,
) -> tuple[Any, dict[str, list[float]]]:
    states = leaves(state)
    model = states[0].model  # the model Keras callbacks see
    if run is not None:
        steps_per_epoch, first_epoch = run.steps_per_epoch, run.first_epoch
    else:
        # With steps_per_epoch, one iterator spans the run (a repeating dataset).
        iterator = data_iterator(train_step, state, data) if steps_per_epoch is not None else None
        first_epoch = 0
    prior = run.prior if run is not None else {}
    cbs = callback_list(
        callbacks,
        model,
        add_history=True,
        add_progbar=verbose != 0,
        verbose=verbose,
        epochs=epochs,
        steps=steps_per_epoch or num_batches(data),
    )
    if getattr(model, "optimizer", None) is None:
        model.optimizer = states[0].optimizer
    model.stop_training = False
    stop = lambda: bool(model.stop_training) or (run is not None and run.preempted)  # noqa: E731
    history = next(cb for cb in cbs.callbacks if isinstance(cb, keras.callbacks.History))

    def full_history() -> dict[str, list[float]]:
        names = list(dict.fromkeys([*prior, *history.history]))
        return {n: [*prior.get(n, []), *history.history.get(n, [])] for n in names}

    cbs.on_train_begin()
    epoch_logs: dict[str, float] = {}
    for epoch in range(first_epoch, epochs):
        start = run.start(epoch) if run is not None else 0
        if start == 0:  # A resumed epoch keeps its restored running metrics.
            reset(train_step, state, train=True)
        cbs.on_epoch_begin(epoch)
        begin, end = batch_hooks(cbs, "train")
        if run is not None:
            iterator = run.iterator(epoch)

            def end(index: int, logs: Any, end: LogsHook = end, epoch: int = epoch) -> None:
                end(index, logs)
                run.after_call(epoch, index + 1)

        state, logs, done = run_pass(
            train_step,
            state,
            data,
            iterator=iterator,
            start=start,
            max_steps=steps_per_epoch,
            hooks=(begin, end),
            stop=stop,
            cap=(lambda done, epoch=epoch: run.steps_to_save(epoch, done)) if run else None,
            endless=run is not None,
        )
        if logs is None and start:  # Resumed right at the end of the epoch's steps.
            logs = current_logs(train_step, state)
        if not done or logs is None:
            raise ValueError(
                f"The training data held no batch in epoch {epoch}"
                + (" (the iterator ran out)." if steps_per_epoch else ".")
            )
        epoch_logs = floats(logs)
        if val_data is not None:
            val = _evaluate(state, val_data, eval_step, cbs)
            epoch_logs.update({f"val_{name}": value for name, value in val.items()})
        cbs.on_epoch_end(epoch, epoch_logs)
        last = epoch == epochs - 1 or bool(model.stop_training)
        if run is not None:
            run.end_epoch(epoch, full_history(), last)
            if not run.stream:  # One iterator per epoch: this one is finished.
                refs, iterator = [iterator], None
                retire(refs)
        if model.stop_training:
            break
    # As Keras `fit` does: e.g. an optimizer with use_ema=True swaps in its averages.
    for s in states:
        s.optimizer.finalize_variable_values(s.model.trainable_variables)
    cbs.on_train_end(epoch_logs)
    return state, full_history()
