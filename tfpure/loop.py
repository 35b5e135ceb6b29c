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

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
import keras
import tensorflow as tf

from tfpure.arrays import from_arrays
from tfpure.builtin import metric_results
from tfpure.callbacks import batch_hooks, callback_list, looks_at_steps, no_end
from tfpure.checkpoint import Checkpointer, recorded_configuration, write_configuration
from tfpure.graph import SHORTEST_WINDOW
from tfpure.record import Record, Windows, call_size
from tfpure.resume import Run
from tfpure.schedule import THROUGHPUT, Action, Actions, Meter
from tfpure.state import leaves
from tfpure.steps import AutoStep, Step, StepFn, make_eval_step
from tfpure.stream import DataStream, check_argument, num_batches, run_calls, run_pass
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
    check_argument(batches, "batches")
    if isinstance(step, AutoStep):
        step = step.choose(state, batches)
    state, logs, done = run_pass(step, state, batches)
    if not done or logs is None:
        raise ValueError("`batches` held no batch: there was nothing to fold over.")
    return state, logs


def _eval_step_for(eval_step: StepFn | None, train_step: StepFn) -> StepFn:
    if eval_step is not None:
        if isinstance(eval_step, Step | AutoStep) and eval_step.kind == "train":
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


def _validator(
    state: Any, val_data: Any, eval_step: StepFn | None, train_step: StepFn, verbose: int
) -> StepFn | None:
    """The validation step of a run (an "auto" one chosen), checked against `val_data`."""
    if val_data is None:
        return eval_step
    eval_step = _eval_step_for(eval_step, train_step)
    if isinstance(eval_step, AutoStep):
        eval_step = eval_step.choose(state, val_data, verbose=verbose)
    DataStream(eval_step, state, val_data).prepare()
    return eval_step


def evaluate(
    state: Any,
    data: Any,
    eval_step: StepFn,
    *,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    verbose: int = 0,
    batch_size: int | None = None,
) -> dict[str, float]:
    """Scores `state` on `data`: resets `state.eval_metrics`, runs `eval_step`, reports.

    `state` may be a structure of states when `eval_step` is a `make_step`
    body; its report is then each log's mean over `data`, weighted by batch size.

    The figures equal Keras' `model.evaluate` for the same model, loss and
    data: the loss is a per-example mean including ``model.losses``.

    Args:
      state: the state to score; only its eval metrics change.
      data: a `tf.data.Dataset` or an iterable of batches; with
        `batch_size`, arrays ``(x, y)`` or ``(x, y, sample_weight)``.
      eval_step: a step from `make_eval_step` (or any `StepFn`).
      callbacks: Keras callbacks; their ``on_test_*`` hooks run.
      verbose: 1 shows Keras' progress bar.
      batch_size: slice arrays given as `data` into batches of this size, in
        order (as Keras `evaluate` does).

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
      >>> tp.evaluate(state, (np.ones((5, 2)), np.zeros((5, 1))), tp.make_eval_step("mse"),
      ...             batch_size=2)
      {'loss': 4.0}
    """
    data = from_arrays(data, batch_size)
    check_argument(data, "data")
    if isinstance(eval_step, Step | AutoStep) and eval_step.kind == "train":
        raise ValueError("`eval_step` is a training step; build it with make_eval_step.")
    if isinstance(eval_step, AutoStep):
        eval_step = eval_step.choose(state, data, verbose=verbose)
    DataStream(eval_step, state, data).prepare()
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
    batch_size: int | None = None,
    shuffle: bool | int | None = None,
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
        each epoch (so a shuffled dataset reshuffles). With `batch_size`:
        arrays, ``x``, ``(x, y)`` or ``(x, y, sample_weight)``, as Keras
        `fit` takes them (see `tfpure.arrays`).
      train_step: a step from `make_train_step` or any `StepFn`.
      epochs: number of epochs, >= 1 (1 if neither `epochs` nor `steps` is given).
      steps: a step budget instead of `epochs`.
      eval_every: with `steps`: steps per evaluation window.
      eval_step: the validation step; by default `make_eval_step` of the
        training loss.
      val_data: validation batches, run after each epoch.
      callbacks: Keras callbacks.
      actions: `Action`s to run at exact steps (see `tp.every`).
      verbose: 0 silent, 1 progress bar (drawn at each call's end: up to 64 steps
        apart at one step a call, in guard windows), 2 one line per epoch (as in Keras).
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
      batch_size: slice arrays given as `data` (and as `val_data`) into
        batches of this size, the last one ragged, as Keras `fit` does.
      shuffle: with `batch_size`: True (the default) shuffles the arrays anew
        each epoch with seed 0, an int with that seed (the same order in
        every run under the same global seed, replayed by a resume), False
        keeps their order (Keras ``fit(..., shuffle=False)`` then reports the
        same history).

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
    data = from_arrays(
        data, batch_size, shuffle=batch_size is not None if shuffle is None else shuffle
    )
    if (
        batch_size is not None
        and val_data is not None
        and not isinstance(val_data, tf.data.Dataset)
    ):
        val_data = from_arrays(val_data, batch_size, argument="val_data")
    windows = _windows(data, epochs, steps, eval_every, steps_per_epoch)
    if isinstance(train_step, Step | AutoStep) and train_step.kind == "eval":
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
        check_argument(val_data, "val_data")
    if checkpoint is not None and not isinstance(checkpoint, Checkpointer):
        raise TypeError(f"`checkpoint` must be a tp.Checkpointer; got {type(checkpoint).__name__}.")
    loop = Loop(
        state,
        data,
        train_step,
        windows,
        eval_step=eval_step,
        val_data=val_data,
        callbacks=callbacks,
        verbose=verbose,
        actions=actions,
        checkpoint=checkpoint,
    )
    return loop()


def _windows(
    data: Any,
    epochs: int | None,
    steps: int | None,
    eval_every: int | None,
    steps_per_epoch: int | None,
) -> Windows:
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
            check_argument(data, "data")
        return Windows.of_steps(steps, eval_every)
    if eval_every is not None:
        raise ValueError(
            "`eval_every` counts steps of a step budget: pass steps= with it (epoch runs "
            "validate after every epoch)."
        )
    if steps_per_epoch is None:
        check_argument(data, "data")
        if (epochs or 1) > 1 and isinstance(data, Iterator):
            raise TypeError(
                f"`data` is an iterator ({type(data).__name__}: a generator?), which can be "
                f"iterated once, but epochs={epochs} iterate over it {epochs} times. Nothing "
                "was trained. Pass a tf.data.Dataset, a list, or an iterable that can be "
                "iterated again (an object whose __iter__ starts over), or epochs=1."
            )
    return Windows(
        count=1 if epochs is None else epochs,
        length=steps_per_epoch or num_batches(data),
        run_wide=steps_per_epoch is not None,
    )


# -- the loop behind fit_loop ---------------------------------------------------------


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


def batch_examples(batch: Any) -> int:
    """Examples in a batch handed to a Python step: the leading size of its first leaf."""
    first = next(iter(tf.nest.flatten(batch)), None)
    shape = getattr(first, "shape", None)
    return int(shape[0]) if shape is not None and len(shape) and shape[0] is not None else 1


def _warn_of_overrun(overrun: str | None, checkpoint: Checkpointer) -> None:
    if overrun:
        warnings.warn(
            f"The checkpoint in {checkpoint.directory} holds a run that trained {overrun}: "
            "nothing is trained, and the state is returned as that run left it (a run is "
            "not cut back). Train in another directory to start over.",
            RuntimeWarning,
            stacklevel=4,
        )


class Loop:
    """`fit_loop`'s engine: the run's `Record`, its windows, and the hooks it calls.

    Each call of the step is planned from the record (`call_size`); after it
    the loop advances the record and calls its hooks with it: Keras batch
    hooks, the due actions, and the `Run`'s saves (step saves, window ends,
    SIGTERM). The data comes from one `DataStream`. Built with checked
    arguments; ``loop()`` trains.
    """

    def __init__(
        self,
        state: Any,
        data: Any,
        step: StepFn,
        windows: Windows,
        *,
        eval_step: StepFn | None,
        val_data: Any,
        callbacks: Sequence[keras.callbacks.Callback],
        verbose: int,
        actions: Sequence[Action],
        checkpoint: Checkpointer | None,
    ):
        self.state, self.windows = state, windows
        self.python_examples = 0
        self.actions = Actions(actions, checkpoint.save_every_steps if checkpoint else None)
        self.model = leaves(state)[0].model  # the model Keras callbacks see
        self.cbs = callback_list(
            callbacks,
            self.model,
            add_history=True,
            add_progbar=verbose != 0,
            verbose=verbose,
            epochs=windows.count,
            steps=windows.steps_in(0),  # the progress bar's target
        )
        self.history = next(
            cb for cb in self.cbs.callbacks if isinstance(cb, keras.callbacks.History)
        )
        self._begin, self._end = batch_hooks(self.cbs, "train")
        self.step = self._train_step(step, data, checkpoint, verbose)
        self.val_data = val_data
        self.eval_step = _validator(state, val_data, eval_step, self.step, verbose)
        self.stream = DataStream(
            self.step,
            state,
            data,
            run_wide=windows.run_wide,
            # A budget, or a checkpointed run (its replay needs the data to last).
            repeat=windows.budget is not None or checkpoint is not None,
            whole_calls=self.actions.steps_to_next(0) is None,
            lengths=(windows.steps_in(0), windows.steps_in(windows.count - 1)),
            span=self._spans(),
        )
        traced = self.stream.prepare()  # before anything changes (a restore included)
        self.record = Record()
        self.run: Run | None = None
        self.prior: dict[str, list[float]] = {}  # the history of a resumed run's windows
        if checkpoint is not None:
            extra = self.step.log_variables(state) if isinstance(self.step, Step) else []
            self.run = Run(
                checkpoint, state, data, stream=windows.run_wide, schedule=windows.describe(),
                extra=extra, traced=traced,
            )  # fmt: skip
            if isinstance(self.step, Step):  # what a resumed "auto" step takes again
                write_configuration(checkpoint, self.step.spec)
            self.record, self.prior = windows.resumed(self.run.record, self.run.prior)
            _warn_of_overrun(windows.overrun(self.record), checkpoint)
        self.stream.start_at(self.record.window, self.record.done, self.record.step)

    def _train_step(
        self, step: StepFn, data: Any, checkpoint: Checkpointer | None, verbose: int
    ) -> StepFn:
        """The step the loop runs: an "auto" step chosen (as a checkpoint recorded it, or
        timed on `data`), a plain function counted."""
        if isinstance(step, AutoStep):
            recorded = recorded_configuration(checkpoint) if checkpoint else None
            step = step.choose(
                self.state, data, span=self._spans(), recorded=recorded, verbose=verbose
            )
        return step if isinstance(step, Step) else self._counting(step)

    def _spans(self) -> bool:
        """Whether calls may span several steps (at one step a call, a guard window):
        nothing looks at the state between them, and actions and saves come seldom."""
        period = self.actions.shortest_period()
        quiet = period is None or period >= SHORTEST_WINDOW
        return quiet and not looks_at_steps(self.cbs)

    def _counting(self, step: StepFn) -> StepFn:
        def counted(state: Any, batch: Any) -> tuple[Any, Logs]:
            self.python_examples += batch_examples(batch)
            return step(state, batch)

        return counted

    def examples(self) -> int:
        if isinstance(self.step, Step):
            return self.step.examples(self.state)
        return self.python_examples

    def full_history(self) -> dict[str, list[float]]:
        """The run's history (restored epochs first), without throughput figures."""
        prior, mine = self.prior, self.history.history
        names = [n for n in dict.fromkeys([*prior, *mine]) if n not in THROUGHPUT]
        return {n: [*prior.get(n, []), *mine.get(n, [])] for n in names}

    def _save(self, where: str) -> None:
        """Saves the run at its record (`where`: what a person reads of that position)."""
        assert self.run is not None
        self.run.save(self.record, self.full_history(), where)

    # -- the run --------------------------------------------------------------------

    def __call__(self) -> tuple[Any, dict[str, list[float]]]:
        try:
            return self._train()
        finally:
            if self.run is not None:
                self.run.close()

    def _train(self) -> tuple[Any, dict[str, list[float]]]:
        model = self.model
        if getattr(model, "optimizer", None) is None:
            model.optimizer = next(
                (s.optimizer for s in leaves(self.state) if s.optimizer is not None), None
            )
        model.stop_training = False
        self.actions.start(self.record.step, self.examples())
        self._batch_meter = Meter(self.record.step, self.examples())
        self.cbs.on_train_begin()
        epoch_logs: dict[str, float] = {}
        first = self.record.window if not self.record.ended else self.windows.count
        for window in range(first, self.windows.count):
            epoch_logs = self._window(window)
            if model.stop_training:
                break
        self.stream.close()
        # As Keras `fit` does: e.g. an optimizer with use_ema=True swaps in its averages.
        for s in leaves(self.state):
            if s.optimizer is not None:
                s.optimizer.finalize_variable_values(s.model.trainable_variables)
        self.cbs.on_train_end(epoch_logs)
        return self.state, self.full_history()

    def _window(self, window: int) -> dict[str, float]:
        """One window: its steps, validation, the epoch hooks and the window's save."""
        cbs, windows, start = self.cbs, self.windows, self.record.done
        length = windows.steps_in(window)
        if start == 0:  # A resumed window keeps its restored running figures.
            reset(self.step, self.state, train=True)
        if start == 0 or self.record.skipped_before is None:
            self.record = attrs.evolve(self.record, skipped_before=self._skipped())
        if length != cbs.params.get("steps"):  # a budget's shorter last window
            cbs.set_params({**cbs.params, "steps": length})
        cbs.on_epoch_begin(window)
        meter = Meter(self.record.step, self.examples())
        logs = self._steps(window, length)
        if logs is None and start:  # Resumed right at the end of the window's steps.
            logs = current_logs(self.step, self.state)
        done = self.record.done
        if not done or logs is None:
            ran_out = " (the iterator ran out)" if windows.run_wide else ""
            raise ValueError(f"The training data held no batch in epoch {window}{ran_out}.")
        if windows.budget is not None and done < length and not self.model.stop_training:
            raise ValueError(
                f"The training data ran out after {self.record.step} of the {windows.budget} "
                "steps of the budget: give a tf.data.Dataset (repeated as needed) or "
                "an iterable that can be iterated again."
            )
        epoch_logs = {**self._own(floats(logs)), **meter.read(self.record.step, self.examples())}
        if self.val_data is not None:
            val = evaluate_pass(self.state, self.val_data, self.eval_step, cbs)
            epoch_logs.update({f"val_{name}": value for name, value in val.items()})
        cbs.on_epoch_end(window, epoch_logs)
        figures = {k: v for k, v in epoch_logs.items() if k not in THROUGHPUT}
        save_due = self.actions.fire(self.state, self.record.step, figures, self.examples)
        self._end_window(window, save_due)
        return epoch_logs

    def _steps(self, window: int, length: int | None) -> Logs | None:
        """The window's steps from the record on; returns the last call's logs."""
        feed = self.stream.feed(window, self.state)  # (made even if no step is left)
        k, actions = feed.span, self.actions
        calls = run_calls(
            feed,
            start=self.record.done,
            limit=length,
            cap=lambda done: call_size(
                self.record, k, length, actions.steps_to_next(self.record.step)
            ),
            hooks=(self._begin, no_end),
        )
        logs: Logs | None = None
        for done, logs in calls:
            self.record = self.record.ran(done - self.record.done)
            self.state = feed.state
            if self._end is not no_end:
                rates = self._batch_meter.read(self.record.step, self.examples())
                self._end(done - 1, {**self._own(logs), **rates})
            # (At a window's end the actions run after validation.)
            fired = done != length and self.actions.fire(
                self.state, self.record.step, logs, self.examples
            )
            if fired:  # a step save was due
                self._save(self.record.where())
            if self.run is not None and self.run.preempted:
                self._save(self.record.where())
            if self.model.stop_training:
                break
        return logs

    def _skipped(self) -> int:
        """The steps skipped so far, as the step's ``logs["skipped"]`` counts them."""
        return int(leaves(self.state)[0].skipped.numpy())

    def _own(self, logs: Any) -> Any:
        """`logs` with ``"skipped"`` counted from the window's start (as the other figures)."""
        if "skipped" not in logs or self.record.skipped_before is None:
            return logs
        return {**logs, "skipped": logs["skipped"] - self.record.skipped_before}

    def _end_window(self, window: int, save_due: bool) -> None:
        """The record moves to the next window; the run saves there if it is due."""
        stopped = bool(self.model.stop_training)
        self.record = self.record.next_window()
        if stopped:
            self.record = self.record.ending(
                f"stopped early after {self.record.step} steps (epoch {window + 1}): a "
                "callback set model.stop_training"
            )
        self.stream.end_window()
        if self.run is None:
            return
        every = self.run.ckpt.save_every_epochs
        last = window == self.windows.count - 1 or stopped
        if last or save_due or self.run.preempted or (every and (window + 1) % every == 0):
            self._save(f"at the end of epoch {window + 1}")


def evaluate_pass(
    state: Any,
    data: Any,
    eval_step: StepFn,
    cbs: keras.callbacks.CallbackList,
) -> dict[str, float]:
    """One evaluation: reset the eval figures, run `eval_step` over `data`, report floats."""
    reset(eval_step, state, train=False)
    cbs.on_test_begin()
    state, logs, done = run_pass(eval_step, state, data, hooks=batch_hooks(cbs, "test"))
    if not done or logs is None:
        raise ValueError("The evaluation data held no batch.")
    result = floats(logs)
    cbs.on_test_end(result)
    return result
