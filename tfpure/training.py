"""The loop behind `fit_loop`: one object owning the schedule, the data position and the actions.

A run is a sequence of *windows*: epochs, or, for a step budget, the
evaluation intervals (``steps=100, eval_every=30`` is windows of 30, 30, 30
and 10 steps). Each window resets the training metrics, runs its steps
(`tfpure.passes.run_pass`), validates, and reports to Keras callbacks as an
epoch. The `Loop` keeps where the run is (window, step in the window, step
in the run), cuts fused calls short at the next due action, runs the
actions, and hands positions to the `Run` that saves them: the
checkpointer's step schedule is one action among the others.

Data flows loop → pass → step → graph and back once per call.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import attrs
import keras
import tensorflow as tf

from tfpure.builtin import metric_results
from tfpure.checkpoint import Checkpointer
from tfpure.passes import batch_hooks, callback_list, run_pass
from tfpure.resume import Run
from tfpure.schedule import THROUGHPUT, Action, Meter
from tfpure.state import leaves
from tfpure.steps import Step, StepFn
from tfpure.stream import DataStream, no_end, run_calls
from tfpure.types import Logs

__all__ = ["Loop", "Schedule", "current_logs", "floats", "reset"]


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


@attrs.frozen
class Schedule:
    """How a run splits into windows (epochs, or evaluation intervals of a step budget).

    Attributes:
      windows: the number of windows.
      length: steps per window; None: until the data runs out (epochs only).
      budget: the run's total steps for a step budget (the last window may
        be shorter), else None.
      stream: one data iterator spans the run (a step budget, or
        ``steps_per_epoch``) instead of one per epoch.
    """

    windows: int
    length: int | None
    budget: int | None = None
    stream: bool = False

    @classmethod
    def of_steps(cls, steps: int, eval_every: int | None) -> Schedule:
        every = eval_every or steps
        return cls(windows=-(-steps // every), length=every, budget=steps, stream=True)

    def describe(self) -> str:
        """How the run splits into windows, as a checkpoint records it."""
        if self.budget is not None:
            return f"evaluation windows of {self.length} steps (a step budget)"
        kind = "one data iterator over the run" if self.stream else "one data pass each"
        return f"epochs of {self.length} steps ({kind})"

    def steps_in(self, window: int) -> int | None:
        if self.budget is None or self.length is None:
            return self.length
        return min(self.length, self.budget - window * self.length)


@attrs.define
class Position:
    """Where the run is: `window`, `done` steps into it, `step` steps in all."""

    window: int = 0
    done: int = 0
    step: int = 0


class Loop:
    """`fit_loop`'s engine. Built with checked arguments; ``loop()`` trains."""

    def __init__(
        self,
        state: Any,
        data: Any,
        step: StepFn,
        schedule: Schedule,
        *,
        eval_step: StepFn | None,
        val_data: Any,
        callbacks: Sequence[keras.callbacks.Callback],
        verbose: int,
        actions: Sequence[Action],
        checkpoint: Checkpointer | None,
    ):
        self.state, self.data, self.schedule = state, data, schedule
        self.eval_step, self.val_data = eval_step, val_data
        self.step = step
        self.python_examples = 0
        if not isinstance(step, Step):
            self.step = self._counting(step)
        self.run: Run | None = None
        self.position = Position()
        if checkpoint is not None:
            self.run = Run(
                checkpoint,
                state,
                data,
                stream=schedule.stream,
                schedule=schedule.describe(),
                extra=step.log_variables(state) if isinstance(step, Step) else [],
            )
            self.position = Position(*self.run.position)
            if self.run.ended:  # It stopped early (EarlyStopping, ...): it stays stopped.
                self.position.window = schedule.windows
        try:
            self.actions = list(actions)
            self.save_action: Action | None = None
            if checkpoint is not None and checkpoint.save_every_steps is not None:
                self.save_action = Action(
                    lambda state, step, logs: self._save_here(), checkpoint.save_every_steps
                )
                self.actions.append(self.save_action)
            self.checkpoint = checkpoint
            self.model = leaves(state)[0].model  # the model Keras callbacks see
            self.cbs = callback_list(
                callbacks,
                self.model,
                add_history=True,
                add_progbar=verbose != 0,
                verbose=verbose,
                epochs=schedule.windows,
                steps=schedule.steps_in(0),  # the progress bar's target
            )
            self.history = next(
                cb for cb in self.cbs.callbacks if isinstance(cb, keras.callbacks.History)
            )
            p = self.position
            self.stream = DataStream(
                self.step,
                state,
                data,
                run_wide=schedule.stream,
                # A budget, or a checkpointed run (its replay needs the data to last).
                repeat=schedule.budget is not None or self.run is not None,
                whole_calls=not any(a.n is not None for a in self.actions),
                lengths=(schedule.steps_in(0), schedule.steps_in(schedule.windows - 1)),
                at=(p.window, p.done, p.step),
            )
            self._window_end: int | None = None  # the step the current window ends at
        except BaseException:  # e.g. a bad callback: the run's lock and handler go back
            if self.run is not None:
                self.run.close()
            raise

    # -- counting -------------------------------------------------------------------

    def _counting(self, step: StepFn) -> StepFn:
        def counted(state: Any, batch: Any) -> tuple[Any, Logs]:
            self.python_examples += batch_examples(batch)
            return step(state, batch)

        return counted

    def examples(self) -> int:
        if isinstance(self.step, Step):
            return self.step._examples(self.state)
        return self.python_examples

    # -- history --------------------------------------------------------------------

    def full_history(self) -> dict[str, list[float]]:
        """The run's history (restored epochs first), without throughput figures."""
        prior = self.run.prior if self.run is not None else {}
        mine = self.history.history
        names = [n for n in dict.fromkeys([*prior, *mine]) if n not in THROUGHPUT]
        return {n: [*prior.get(n, []), *mine.get(n, [])] for n in names}

    # -- actions --------------------------------------------------------------------

    def _steps_to_next_action(self, done: int) -> int | None:
        step = self.position.step - self.position.done + done
        due = [a.steps_to_next(step) for a in self.actions if a.n is not None]
        return min(due) if due else None

    def _fire(self, state: Any, logs: Logs | dict[str, float], *, include_save: bool) -> bool:
        """Runs the due actions; returns whether the save action was due (and left out).

        The logs are read back (and the examples counted) only if an action runs.
        """
        now = time.perf_counter()
        step, figures, examples = self.position.step, None, 0
        save_due = False
        for i, action in enumerate(self.actions):
            if not action.due(step, now, self._last[i]):
                continue
            if action is self.save_action and not include_save:
                save_due = True
                continue
            if figures is None:
                figures, examples = floats(logs), self.examples()
            action.fn(state, step, {**figures, **self._meters[i].read(step, examples, now)})
            self._last[i] = now
        return save_due

    def _save_here(self) -> None:
        """Saves the run at its position inside the current window."""
        assert self.run is not None
        p = self.position
        self.run.save(
            (p.window, p.done, p.step),
            self.full_history(),
            f"after step {p.done} of epoch {p.window + 1}",  # counted from 1, as Keras
        )

    def _after_call(self, state: Any, done: int, logs: Logs) -> None:
        """After every call: the position, Keras batch hooks, due actions, SIGTERM."""
        p = self.position
        p.step += done - p.done
        p.done = done
        self.state = state
        if self._end is not no_end:
            rates = self._batch_meter.read(p.step, self.examples())
            self._end(done - 1, {**logs, **rates})
        if p.step != self._window_end:  # At a window's end they run after validation.
            self._fire(state, logs, include_save=True)
        if self.run is not None and self.run.preempted:
            self._save_here()

    # -- the run --------------------------------------------------------------------

    def __call__(self) -> tuple[Any, dict[str, list[float]]]:
        try:
            return self._train()
        finally:
            if self.run is not None:
                self.run.close()

    def _train(self) -> tuple[Any, dict[str, list[float]]]:
        model, schedule, cbs, p = self.model, self.schedule, self.cbs, self.position
        if getattr(model, "optimizer", None) is None:
            model.optimizer = leaves(self.state)[0].optimizer
        model.stop_training = False
        examples = self.examples()
        now = time.perf_counter()
        self._last = [now] * len(self.actions)
        self._meters = [Meter(p.step, examples, now) for _ in self.actions]
        self._batch_meter = Meter(p.step, examples, now)
        begin, self._end = batch_hooks(cbs, "train")

        cbs.on_train_begin()
        epoch_logs: dict[str, float] = {}
        for window in range(p.window, schedule.windows):
            start = p.done if window == p.window else 0
            p.window, p.done = window, start
            length = schedule.steps_in(window)
            self._window_end = None if length is None else p.step - start + length
            if start == 0:  # A resumed window keeps its restored running figures.
                reset(self.step, self.state, train=True)
            if length != cbs.params.get("steps"):  # a budget's shorter last window
                cbs.set_params({**cbs.params, "steps": length})
            cbs.on_epoch_begin(window)
            meter = Meter(p.step, self.examples())
            logs: Logs | None = None
            done = start
            feed = self.stream.feed(window, self.state)  # (made even if no step is left)
            calls = run_calls(
                feed,
                start=start,
                limit=length,
                cap=self._steps_to_next_action,
                hooks=(begin, no_end),
            )
            for done, logs in calls:
                self._after_call(feed.state, done, logs)
                if model.stop_training:
                    break
            del feed, calls
            if logs is None and start:  # Resumed right at the end of the window's steps.
                logs = current_logs(self.step, self.state)
            if not done or logs is None:
                ran_out = " (the iterator ran out)" if schedule.stream else ""
                raise ValueError(f"The training data held no batch in epoch {window}{ran_out}.")
            if schedule.budget is not None and done < length and not model.stop_training:
                raise ValueError(
                    f"The training data ran out after {p.step} of the {schedule.budget} "
                    "steps of the budget: give a tf.data.Dataset (repeated as needed) or "
                    "an iterable that can be iterated again."
                )
            epoch_logs = {**floats(logs), **meter.read(p.step, self.examples())}
            if self.val_data is not None:
                val = evaluate_pass(self.state, self.val_data, self.eval_step, cbs)
                epoch_logs.update({f"val_{name}": value for name, value in val.items()})
            cbs.on_epoch_end(window, epoch_logs)
            figures = {k: v for k, v in epoch_logs.items() if k not in THROUGHPUT}
            save_due = self._fire(self.state, figures, include_save=False)
            last = window == schedule.windows - 1 or bool(model.stop_training)
            p.window, p.done = window + 1, 0
            if self.run is not None:
                if model.stop_training:
                    self.checkpoint.ended.assign(
                        f"stopped early after {p.step} steps (epoch {window + 1}): a callback "
                        "set model.stop_training"
                    )
                every = self.checkpoint.save_every_epochs
                if last or save_due or self.run.preempted or (every and (window + 1) % every == 0):
                    self.run.save(
                        (p.window, p.done, p.step),
                        self.full_history(),
                        f"at the end of epoch {window + 1}",
                    )
            self.stream.end_window()
            if model.stop_training:
                break
        self.stream.close()
        # As Keras `fit` does: e.g. an optimizer with use_ema=True swaps in its averages.
        for s in leaves(self.state):
            s.optimizer.finalize_variable_values(s.model.trainable_variables)
        cbs.on_train_end(epoch_logs)
        return self.state, self.full_history()


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
