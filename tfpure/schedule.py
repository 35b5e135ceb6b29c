"""Actions at exact steps: `every`, `tensorboard_writer`, and the throughput they report.

An `Action` is what clu calls a periodic action and Orbit a trigger: a
function ``fn(state, step, logs)`` that `fit_loop(..., actions=[...])` runs
after every `n`-th training step (or every so many seconds). The loop cuts
fused calls (``steps_per_call > 1``) short so that the state an action sees
is the state after exactly that step.

`step` counts the training steps of the run (with a `Checkpointer`, across
restarts); for a state trained only by this run it equals ``state.step``.
`logs` are the running training figures of the current window as Python
floats, plus the throughput since the action last ran
(``steps_per_second``, ``examples_per_second``); an action that falls on the
last step of an epoch (or evaluation window) runs after that window's
validation and also sees its ``val_*`` figures.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import tensorflow as tf

from tfpure.distribute import cluster_task, strategy_of
from tfpure.state import leaves
from tfpure.types import check_count

__all__ = ["THROUGHPUT", "Action", "Actions", "Meter", "every", "tensorboard_writer"]

# The log names of throughput figures (reported, never part of `history`).
THROUGHPUT = ("steps_per_second", "examples_per_second")


@attrs.frozen
class Action:
    """Something to run during training: ``fn(state, step, logs)`` every `n` steps or `seconds`.

    Made by `every` (or `tensorboard_writer`); passed to
    ``fit_loop(..., actions=[...])``. Immutable, so one action can serve
    several runs; the loop keeps when it last ran.

    Attributes:
      fn: the function, called as ``fn(state, step, logs)``.
      n: run after every `n`-th step (step n, 2n, ...), or None.
      seconds: run after the first call that ends at least `seconds` after
        the action last ran (or after the run started), or None.

    Example:
      >>> import tfpure as tp
      >>> action = tp.every(100, lambda state, step, logs: None)
      >>> action.n, action.seconds, action.steps_to_next(250)
      (100, None, 50)
    """

    fn: Callable[[Any, int, dict[str, float]], Any]
    n: int | None = None
    seconds: float | None = None

    def __attrs_post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"An action's `fn` must be callable; got {self.fn!r}.")
        check_count("n", self.n, optional=True)
        check_count("seconds", self.seconds, optional=True, integer=False)
        if self.n is None and self.seconds is None:
            raise ValueError("An action needs `n` (steps) or `seconds`; both are None.")

    def steps_to_next(self, step: int) -> int | None:
        """Steps from `step` to the next multiple of `n` (None without `n`).

        Example:
          >>> import tfpure as tp
          >>> [tp.every(10, print).steps_to_next(s) for s in (0, 3, 10)]
          [10, 7, 10]
        """
        if self.n is None:
            return None
        return self.n - step % self.n

    def due(self, step: int, now: float, last: float) -> bool:
        """Whether the action runs after `step`, at time `now`, having last run at `last`.

        Example:
          >>> import tfpure as tp
          >>> action = tp.every(10, print, seconds=60.0)
          >>> action.due(20, now=5.0, last=0.0), action.due(21, 5.0, 0.0), action.due(21, 61.0, 0.0)
          (True, False, True)
        """
        by_steps = self.n is not None and step % self.n == 0
        by_time = self.seconds is not None and now - last >= self.seconds
        return by_steps or by_time


def every(
    n: int | None,
    fn: Callable[[Any, int, dict[str, float]], Any],
    *,
    seconds: float | None = None,
) -> Action:
    """An action running ``fn(state, step, logs)`` after every `n`-th training step.

    Whatever `steps_per_call` is, `fit_loop` cuts fused calls so that `fn`
    sees the state after exactly step n, 2n, ... With `seconds` it also runs
    after the first call that ends `seconds` after its last run (then, with
    fused steps, at a call boundary); ``n=None`` runs by time only.

    Args:
      n: steps between runs (an int >= 1), or None.
      fn: the function; `state` is the state (or structure of states) after
        the step, `step` the run's step count, `logs` the running training
        figures as floats with ``steps_per_second`` and
        ``examples_per_second`` since `fn` last ran.
      seconds: seconds between runs, or None.

    Returns:
      An `Action` for ``fit_loop(..., actions=[...])``.

    Example:
      >>> import keras, tensorflow as tf, tfpure as tp
      >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
      >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD(0.01))
      >>> data = tf.data.Dataset.from_tensor_slices((tf.ones((64, 2)), tf.ones((64, 1)))).batch(4)
      >>> seen = []
      >>> log = tp.every(5, lambda state, step, logs: seen.append((step, int(state.step))))
      >>> state, _ = tp.fit_loop(state, data, tp.make_train_step("mse", steps_per_call=4),
      ...                        steps=12, actions=[log], verbose=0)
      >>> seen
      [(5, 5), (10, 10)]
    """
    return Action(fn, n, seconds)


class Meter:
    """Throughput since the last reading: steps and examples per second of wall time.

    Example:
      >>> from tfpure.schedule import Meter
      >>> meter = Meter(step=0, examples=0, now=10.0)
      >>> meter.read(step=50, examples=1600, now=12.0)
      {'steps_per_second': 25.0, 'examples_per_second': 800.0}
    """

    def __init__(self, step: int, examples: int, now: float | None = None):
        self.reset(step, examples, now)

    def reset(self, step: int, examples: int, now: float | None = None) -> None:
        self.step, self.examples = step, examples
        self.time = time.perf_counter() if now is None else now

    def read(self, step: int, examples: int, now: float | None = None) -> dict[str, float]:
        """The rates since the last reading (or reset), and starts the next window."""
        now = time.perf_counter() if now is None else now
        elapsed = max(now - self.time, 1e-9)
        rates = {
            "steps_per_second": (step - self.step) / elapsed,
            "examples_per_second": (examples - self.examples) / elapsed,
        }
        self.reset(step, examples, now)
        return rates


class Actions:
    """The actions of one run and when each last ran: `fire` runs the ones due.

    A checkpoint's step saves (every `save_every` steps) are due as an
    action's steps are, but `fire` only reports them: the loop saves.

    Example:
      >>> import tfpure as tp
      >>> from tfpure.schedule import Actions
      >>> seen = []
      >>> actions = Actions([tp.every(2, lambda state, step, logs: seen.append(step))], 3)
      >>> actions.start(step=0, examples=0, now=0.0)
      >>> [actions.fire(None, s, {}, lambda: 0, now=1.0) for s in (1, 2, 3, 4)], seen
      ([False, False, True, False], [2, 4])
      >>> actions.steps_to_next(4)  # to step 6, a save
      2
    """

    def __init__(self, actions: Sequence[Action], save_every: int | None = None):
        self.actions = list(actions)
        # The step saves, due as an action with `n` would be (`fire` only reports them).
        self._save = None if save_every is None else Action(_report_only, save_every)
        self.start(0, 0)

    def steps_to_next(self, step: int) -> int | None:
        """Steps from `step` to the next step an action or a save is due at by steps
        (None: none is), where a fused call must end."""
        return min((a.steps_to_next(step) for a in self._stepped()), default=None)

    def shortest_period(self) -> int | None:
        """The fewest steps between two steps an action or a save is due at (None: no
        action is due by steps). `Actions([tp.every(5, fn)], 3).shortest_period()` is 3."""
        return min((a.n for a in self._stepped() if a.n is not None), default=None)

    def _stepped(self) -> list[Action]:
        return [a for a in (*self.actions, self._save) if a is not None and a.n is not None]

    def start(self, step: int, examples: int, now: float | None = None) -> None:
        """The run starts (or resumes) at `step`, `examples` seen: no action ran yet."""
        now = time.perf_counter() if now is None else now
        self._last = [now] * len(self.actions)
        self._meters = [Meter(step, examples, now) for _ in self.actions]

    def fire(
        self,
        state: Any,
        step: int,
        logs: Mapping[str, Any],
        examples: Callable[[], int],
        now: float | None = None,
    ) -> bool:
        """Runs the actions due after `step`; returns whether a step save is due there.

        The logs are read back (and the examples counted) only if an action runs.
        """
        now = time.perf_counter() if now is None else now
        figures: dict[str, float] | None = None
        seen = 0
        for i, action in enumerate(self.actions):
            if not action.due(step, now, self._last[i]):
                continue
            if figures is None:
                figures, seen = {k: float(v) for k, v in logs.items()}, examples()
            action.fn(state, step, {**figures, **self._meters[i].read(step, seen, now)})
            self._last[i] = now
        return self._save is not None and self._save.due(step, now, now)


def _report_only(state: Any, step: int, logs: dict[str, float]) -> None:
    """The step saves' action: `Actions.fire` reports them; the loop saves."""


def tensorboard_writer(
    logdir: str | os.PathLike[str],
    n: int | None = 100,
    *,
    seconds: float | None = None,
) -> Action:
    """An action writing the training logs as TensorBoard scalars every `n` steps.

    Each run writes every log (``loss``, metrics, ``steps_per_second``,
    ``examples_per_second``, and at an evaluation step the ``val_*``
    figures) with `tf.summary.scalar` at the run's step, and flushes. Point
    TensorBoard at `logdir`. Under a multi-worker strategy only the chief
    writes.

    Args:
      logdir: the directory of the event files (created if needed).
      n: steps between writes, or None.
      seconds: seconds between writes, or None.

    Returns:
      An `Action`.

    Example:
      >>> import glob, keras, tempfile, tensorflow as tf, tfpure as tp
      >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
      >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD(0.01))
      >>> data = tf.data.Dataset.from_tensor_slices((tf.ones((8, 2)), tf.ones((8, 1)))).batch(2)
      >>> logdir = tempfile.mkdtemp()
      >>> _ = tp.fit_loop(state, data, tp.make_train_step("mse"), steps=10,
      ...                 actions=[tp.tensorboard_writer(logdir, 5)], verbose=0)
      >>> len(glob.glob(f"{logdir}/events.out.tfevents.*"))
      1
    """
    path = os.fspath(logdir)
    writer: list[Any] = []  # created at the first write, in the training process

    def write(state: Any, step: int, logs: dict[str, float]) -> None:
        task = cluster_task(strategy_of(leaves(state)))
        if task is not None and not task.chief:
            return
        if not writer:
            writer.append(tf.summary.create_file_writer(path))
        with writer[0].as_default(step=step):
            for name, value in logs.items():
                tf.summary.scalar(name, value)
        writer[0].flush()

    return Action(write, n, seconds)
