"""Where a run is and how it is cut: the run `Record`, its `Windows`, and the size of a call.

A `fit_loop` run is a sequence of *windows*: epochs, or, for a step budget,
the evaluation intervals (``steps=100, eval_every=30`` is windows of 30, 30,
30 and 10 steps). Each window resets the training metrics, runs its steps,
validates, and reports to Keras callbacks as an epoch.

The `Record` is the one place that says where the run is: the window, the
steps done in it, the steps done in all, and why the run ended early (if it
did). The loop holds it, advances it after every call and hands it to its
hooks (actions, saves); a `Checkpointer` saves it and a resumed run starts
from it. `call_size` plans each call from it: `steps_per_call` steps, cut
to end the window and to land on the next step a periodic action is due.
"""

from __future__ import annotations

import attrs

__all__ = ["Record", "Windows", "call_size"]


@attrs.frozen
class Windows:
    """How a run splits into windows (epochs, or evaluation intervals of a step budget).

    Attributes:
      count: the number of windows.
      length: steps per window; None: until the data runs out (epochs only).
      budget: the run's total steps for a step budget (the last window may
        be shorter), else None.
      run_wide: one data iterator spans the run (a step budget, or
        ``steps_per_epoch``) instead of one per window.

    Example:
      >>> from tfpure.record import Windows
      >>> windows = Windows.of_steps(100, 30)
      >>> windows.count, [windows.steps_in(w) for w in range(windows.count)]
      (4, [30, 30, 30, 10])
    """

    count: int
    length: int | None
    budget: int | None = None
    run_wide: bool = False

    @classmethod
    def of_steps(cls, steps: int, eval_every: int | None) -> Windows:
        every = eval_every or steps
        return cls(count=-(-steps // every), length=every, budget=steps, run_wide=True)

    def describe(self) -> str:
        """How the run splits into windows, as a checkpoint records it."""
        if self.budget is not None:
            return f"evaluation windows of {self.length} steps (a step budget)"
        kind = "one data iterator over the run" if self.run_wide else "one data pass each"
        return f"epochs of {self.length} steps ({kind})"

    def overrun(self, record: Record) -> str | None:
        """What a restored `record` trained beyond these windows' end, or None.

        Example:
          >>> from tfpure.record import Record, Windows
          >>> Windows.of_steps(30, 10).overrun(Record(window=5, done=0, step=50))
          '50 steps, more than the 30 of this run'
          >>> print(Windows(count=5, length=8).overrun(Record(window=5, done=0, step=40)))
          None
        """
        if self.budget is not None and record.step > self.budget:
            return f"{record.step} steps, more than the {self.budget} of this run"
        if self.budget is None and record.window > self.count:
            return f"{record.window} epochs, more than the {self.count} of this run"
        return None

    def steps_in(self, window: int) -> int | None:
        """The steps of `window` (None: until the data runs out)."""
        if self.budget is None or self.length is None:
            return self.length
        return min(self.length, self.budget - window * self.length)

    def resumed(
        self, record: Record, history: dict[str, list[float]]
    ) -> tuple[Record, dict[str, list[float]]]:
        """A restored `record` and its run's `history`, read under these windows.

        A step budget's windows are alike but the last: its position is its step
        count. A finished budget whose last window was short (45 steps in windows
        of 20: 20, 20, 5), extended (to 60), goes on inside that window, 5 steps
        into it, as if the longer budget had been run at once; the short
        window's history entry goes, the window reports once, whole.

        Example:
          >>> from tfpure.record import Record, Windows
          >>> done = Record(window=3, done=0, step=45)
          >>> Windows.of_steps(60, 20).resumed(done, {"loss": [0.9, 0.7, 0.6]})
          (Record(window=2, done=5, step=45, ended=''), {'loss': [0.9, 0.7]})
        """
        if self.budget is None or self.length is None or record.ended:
            return record, history
        window, done = divmod(record.step, self.length)
        if record.step >= self.budget or (window, done) == (record.window, record.done):
            return record, history
        continued = attrs.evolve(record, window=window, done=done)
        return continued, {name: values[:window] for name, values in history.items()}


@attrs.frozen
class Record:
    """Where a run is: `window` (counted from 0), `done` steps into it, `step` steps in all,
    and why it `ended` before its windows did ("" while it has not). `skipped_before`: the
    states' count of skipped steps when the window began (the history reports the window's
    own; None where it is not known: a checkpoint written before tfpure recorded it).

    Example:
      >>> from tfpure.record import Record
      >>> r = Record().ran(8).ran(4)
      >>> r, r.next_window()
      (Record(window=0, done=12, step=12, ended=''), Record(window=1, done=0, step=12, ended=''))
    """

    window: int = 0
    done: int = 0
    step: int = 0
    ended: str = ""
    skipped_before: int | None = attrs.field(default=None, repr=False)

    def ran(self, steps: int) -> Record:
        """The record after `steps` more steps in the window."""
        return attrs.evolve(self, done=self.done + steps, step=self.step + steps)

    def next_window(self) -> Record:
        """The record at the start of the next window."""
        return attrs.evolve(self, window=self.window + 1, done=0)

    def ending(self, why: str) -> Record:
        """The record of a run that ended before its windows did, and `why`."""
        return attrs.evolve(self, ended=why)

    def where(self) -> str:
        """Where in the run the record is, as a person reads it (epochs counted from 1)."""
        return f"after step {self.done} of epoch {self.window + 1}"


def call_size(record: Record, k: int, length: int | None, to_action: int | None) -> int:
    """The steps of the next call: `k`, cut to end the window (`length` steps) and to end
    on the step an action is due at, `to_action` steps on (None: none is).

    Example:
      >>> from tfpure.record import Record, call_size
      >>> call_size(Record(done=2, step=10), 16, 8, 5)  # the window ends in 6, an action in 5
      5
    """
    n = k if length is None else min(k, length - record.done)
    return n if to_action is None else min(n, to_action)
