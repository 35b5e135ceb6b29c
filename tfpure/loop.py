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
import tensorflow as tf

from tfpure.checkpoint import Checkpointer
from tfpure.passes import callback_list, check_data, num_batches, prepare, run_pass
from tfpure.schedule import Action
from tfpure.state import leaves
from tfpure.steps import Step, StepFn, make_eval_step
from tfpure.training import Loop, Schedule, evaluate_pass
from tfpure.types import Logs, check_count

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


def _eval_step_for(eval_step: StepFn | None, train_step: StepFn) -> StepFn:
    if eval_step is not None:
        if isinstance(eval_step, Step) and eval_step.kind == "train":
            raise ValueError("`eval_step` is a training step; build it with make_eval_step(loss).")
        return eval_step
    if isinstance(train_step, Step) and train_step.kind == "train":
        return make_eval_step(
            train_step.loss,
            loss_weights=train_step.spec.loss_weights,
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
    return evaluate_pass(state, data, eval_step, cbs)


def fit_loop(
    state: Any,
    data: Any,
    train_step: StepFn,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    eval_every: int | None = None,
    eval_step: StepFn | None = None,
    val_data: Any = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    actions: Sequence[Action] = (),
    verbose: int = 1,
    steps_per_epoch: int | None = None,
    checkpoint: Checkpointer | None = None,
) -> tuple[Any, dict[str, list[float]]]:
    """Trains for `epochs` epochs (or `steps` steps) with validation, callbacks and actions.

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

    A step budget (``steps=N``, Orbit-style) replaces epochs: the data is
    repeated as needed and read by one iterator, and ``eval_every=M`` splits
    the run into evaluation windows of M steps (the last one shorter if M
    does not divide N). Each window is an epoch for the callbacks and in
    `history`: its training figures run over the window, and `val_data` is
    evaluated at its end. Without `eval_every` the budget is one window.

    `actions` (from `tp.every`, `tp.tensorboard_writer`) run
    ``fn(state, step, logs)`` after every n-th step, in epochs as in step
    budgets: fused calls are cut short so the state is the one after
    exactly that step. The logs hold the running training figures and the
    throughput since the action last ran (``steps_per_second``,
    ``examples_per_second``). Keras callbacks receive the same throughput in
    their batch and epoch logs (so the progress bar and `TensorBoard` show
    it); `history` leaves it out.

    If the model has no `optimizer` attribute (it was never compiled), it is
    set to `state.optimizer` so callbacks that read it (`ReduceLROnPlateau`,
    `LearningRateScheduler`) work.

    Args:
      state: the state to train.
      data: a `tf.data.Dataset` or an iterable of batches. A new pass starts
        each epoch (so a shuffled dataset reshuffles).
      train_step: a step from `make_train_step` or any `StepFn`.
      epochs: number of epochs, >= 1 (1 if neither `epochs` nor `steps` is given).
      steps: a step budget instead of `epochs`.
      eval_every: with `steps`: steps per evaluation window.
      eval_step: the validation step; by default `make_eval_step` of the
        training loss.
      val_data: validation batches, run after each epoch.
      callbacks: Keras callbacks.
      actions: `Action`s to run at exact steps (see `tp.every`).
      verbose: 0 silent, 1 progress bar, 2 one line per epoch (as in Keras).
      steps_per_epoch: if given, each epoch runs this many steps from one
        iterator kept across epochs (needed for a repeating dataset).
      checkpoint: a `Checkpointer`. `fit_loop` then restores the newest good
        checkpoint and resumes at its exact step, saves as the checkpointer
        says, and on SIGTERM finishes the current call, saves and raises
        `Preempted`. `data` must be a `tf.data.Dataset` built from seeded
        TensorFlow ops (a resumed run replays it to the saved position) whose
        epoch length is known (its cardinality, or `steps_per_epoch`; a step
        budget needs none). A step-budget run resumes at its step: actions
        and evaluations fire as in an uninterrupted run.

    Returns:
      ``(state, history)`` where ``history`` maps Keras log names (`loss`,
      `accuracy`, `val_loss`, ...) to one float per epoch (or window).

    Raises:
      ValueError: `epochs` or `steps` < 1 (or both given), empty or
        infinite data, wrong kind of step.
      TypeError: `data` is not a dataset or iterable of batches.
      CheckpointError: with `checkpoint`, no checkpoint fits the state, the
        newest was written by a run of another schedule (epoch length, or a
        budget's `eval_every`), or the data cannot be replayed to a saved
        position. Nothing changed.
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
    schedule = _schedule(data, epochs, steps, eval_every, steps_per_epoch)
    if isinstance(train_step, Step) and train_step.kind == "eval":
        raise ValueError("`train_step` is an evaluation step; build it with make_train_step(loss).")
    if not callable(train_step):
        raise TypeError(f"`train_step` must be callable; got {train_step!r}.")
    for action in actions:
        if not isinstance(action, Action):
            raise TypeError(
                "`actions` must hold tp.Action objects (made by tp.every(n, fn) or "
                f"tp.tensorboard_writer); got {type(action).__name__}."
            )
    if val_data is not None:
        check_data(val_data, "val_data")
        eval_step = _eval_step_for(eval_step, train_step)
    if checkpoint is not None and not isinstance(checkpoint, Checkpointer):
        raise TypeError(f"`checkpoint` must be a tp.Checkpointer; got {type(checkpoint).__name__}.")
    prepare(train_step, state, data)
    if val_data is not None:
        prepare(eval_step, state, val_data)
    loop = Loop(
        state,
        data,
        train_step,
        schedule,
        eval_step=eval_step,
        val_data=val_data,
        callbacks=callbacks,
        verbose=verbose,
        actions=actions,
        checkpoint=checkpoint,
    )
    return loop()


def _schedule(
    data: Any,
    epochs: int | None,
    steps: int | None,
    eval_every: int | None,
    steps_per_epoch: int | None,
) -> Schedule:
    """The run's windows, from `fit_loop`'s arguments (checked here)."""
    for name, value in (
        ("epochs", epochs),
        ("steps", steps),
        ("eval_every", eval_every),
        ("steps_per_epoch", steps_per_epoch),
    ):
        check_count(name, value, optional=True)
    if steps is not None:
        if epochs is not None:
            raise ValueError(
                f"Give `epochs` or `steps`, not both (got epochs={epochs}, steps={steps})."
            )
        if steps_per_epoch is not None:
            raise ValueError(
                "`steps_per_epoch` counts epochs; a step budget (`steps=`) has no epochs. "
                "Use eval_every= to split it into evaluation windows."
            )
        if isinstance(data, tf.data.Dataset) and int(data.cardinality()) == 0:
            raise ValueError("`data` held no batch: the dataset is empty.")
        if not isinstance(data, tf.data.Dataset):
            check_data(data, "data")
        return Schedule.of_steps(steps, eval_every)
    if eval_every is not None:
        raise ValueError(
            "`eval_every` counts steps of a step budget: pass steps= with it (epoch runs "
            "validate after every epoch)."
        )
    if steps_per_epoch is None:
        check_data(data, "data")
    return Schedule(
        windows=1 if epochs is None else epochs,
        length=steps_per_epoch or num_batches(data),
        stream=steps_per_epoch is not None,
    )
