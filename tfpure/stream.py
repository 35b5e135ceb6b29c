"""The data a loop reads: one `DataStream` owns every iterator of a pass or a run.

A stream checks the data against the step before anything runs (`prepare`),
makes the iterators (one per epoch, or one over the repeated data for a
step budget or ``steps_per_epoch``), groups a call's batches for an XLA
step when every call is whole (`Step.grouped`), replays them to a resumed
run's position, and hands finished iterators to a background deleter
(`retire`). A `Feed` is one iterator bound to a step: ``feed.call(n)`` runs
up to `n` steps on its next batches. `run_calls` is the loop over calls
that `fold`, `evaluate` and `fit_loop` share; `run_pass` is one pass.
"""

from __future__ import annotations

import atexit
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import tensorflow as tf

from tfpure.callbacks import BatchHook, LogsHook, no_begin, no_end
from tfpure.checkpoint import CheckpointError
from tfpure.distribute import cluster_task, strategy_of
from tfpure.state import leaves
from tfpure.types import Logs, LoopStep, StepFn

__all__ = [
    "DataStream",
    "Feed",
    "check_argument",
    "drain_retired",
    "num_batches",
    "retire",
    "run_calls",
    "run_pass",
]


def check_argument(data: Any, argument: str) -> None:
    """Raises unless `data` is a finite, non-empty dataset or an iterable of batches."""
    if isinstance(data, tf.data.Dataset):
        if int(data.cardinality()) == 0:
            raise ValueError(f"`{argument}` held no batch: the dataset is empty.")
        if int(data.cardinality()) == tf.data.INFINITE_CARDINALITY:
            raise ValueError(
                f"`{argument}` is an infinite dataset (it repeats forever); pass "
                "`steps_per_epoch=` to fit_loop, or take a finite part with "
                "dataset.take(n)."
            )
        return
    if isinstance(data, tuple) or not isinstance(data, Iterable):
        raise TypeError(
            f"`{argument}` must be a tf.data.Dataset or an iterable of batches; got "
            f"{type(data).__name__}. For arrays, pass batch_size= (e.g. "
            "fit_loop(state, (x, y), step, batch_size=32))."
        )


def num_batches(data: Any) -> int | None:
    """The batches in a pass over `data`, if known."""
    if isinstance(data, tf.data.Dataset):
        n = int(data.cardinality())
        return n if n >= 0 else None
    try:
        return len(data)
    except TypeError:
        return None


# -- retiring finished iterators ------------------------------------------------------

_retired: queue.SimpleQueue = queue.SimpleQueue()
_reaper_lock = threading.Lock()
_reaper: threading.Thread | None = None

# The autotuner's period grows to at most a minute: a deletion waits no longer.
_EXIT_WAIT_SECONDS = 90.0


def _reap() -> None:
    while True:
        objects, done = _retired.get()
        objects.clear()  # The last references: a finished iterator is deleted here.
        del objects
        if done is not None:
            done.set()


def retire(refs: list[Any]) -> None:
    """Lets a finished data iterator be deleted off the training thread.

    Deleting a `tf.data` iterator whose pipeline autotunes (``AUTOTUNE``
    anywhere in it) blocks until the autotuner's next wake-up, and its
    period doubles from 10 ms over the iterator's life: measured on
    TensorFlow 2.21, an epoch of ~1.8 s ends at 2.55 s. Keras `fit` and the
    hand-written loop pay that at every epoch's end; tfpure's loops hand the
    iterator to one daemon thread that drops it while training goes on, and
    wait for that thread at interpreter exit (a daemon thread inside
    TensorFlow while Python finalizes can abort the process).

    `refs` is emptied: its items move to that thread, which must hold the
    last references (delete other names for them first). Only plain
    `tf.data.Iterator`s move; anything else (a multi-worker distributed
    iterator) is left to the caller's references and deleted as usual.
    """
    global _reaper
    if not any(isinstance(ref, tf.data.Iterator) for ref in refs):
        return
    with _reaper_lock:
        if _reaper is None or not _reaper.is_alive():
            _reaper = threading.Thread(target=_reap, name="tfpure-iterator-reaper", daemon=True)
            _reaper.start()
            atexit.register(drain_retired, timeout=_EXIT_WAIT_SECONDS)
    objects = list(refs)
    refs.clear()
    _retired.put((objects, None))


def drain_retired(timeout: float | None = None) -> bool:
    """Waits until everything retired so far is deleted; False on timeout."""
    if _reaper is None:
        return True
    done = threading.Event()
    _retired.put(([], done))
    return done.wait(timeout)


# -- iterators ------------------------------------------------------------------------


def data_iterator(step: StepFn, state: Any, data: tf.data.Dataset) -> Any:
    """An iterator over `data` for `step`, distributed if the state spans several workers.

    With a multi-worker strategy, `strategy.experimental_distribute_dataset`
    shards the data between workers and splits each global batch across the
    replicas (a ragged last batch too, some replicas possibly getting no
    example). In one process tfpure steps split the global batch in-graph
    (see `tfpure.graph`), so the iterator is an ordinary one.
    """
    if isinstance(step, LoopStep):
        strategy = strategy_of(leaves(state))
        if cluster_task(strategy) is not None:
            return iter(strategy.experimental_distribute_dataset(data))
    return iter(data)


def _cycle(data: Iterable[Any]) -> Iterator[Any]:
    """`data` over and over (each pass a new iteration); ends if a pass yields nothing."""
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            return


@tf.function(autograph=False)
def _skip(iterator: Any, n: tf.Tensor) -> tf.Tensor:
    """Pulls up to `n` elements from `iterator` in one graph call; returns how many there were.

    Stops at the first missing element: data shorter than the saved position
    ends the replay (and the stream names the mismatch) instead of spinning.
    """

    def body(i: tf.Tensor, more: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        more = iterator.get_next_as_optional().has_value()
        return i + tf.cast(more, tf.int32), more

    return tf.while_loop(
        lambda i, more: tf.logical_and(more, i < n), body, (tf.constant(0), tf.constant(True))
    )[0]


_END = object()


class Feed:
    """One iterator bound to a step: ``logs, ran = feed.call(n, begin)`` runs up to n steps.

    A tfpure `Step` on a `tf.data` iterator runs a call's steps in one graph
    call (`Step.runner`); any other step is called once per batch in Python,
    and `state` follows what it returns. `ran` is 0 once the data ran out;
    it is read back from the graph only where the data may run out
    (`counted`), so a call over data known to last needs no host read.
    """

    def __init__(
        self,
        step: StepFn,
        state: Any,
        iterator: Any,
        *,
        grouped: bool,
        counted: bool,
        span: bool = False,
    ):
        self.step, self.state, self.iterator = step, state, iterator
        self.counted = counted
        self.in_graph = isinstance(step, LoopStep) and hasattr(iterator, "get_next_as_optional")
        self.steps_per_call = step.steps_per_call if self.in_graph else 1
        # The steps a call asks for: more while nothing looks between them (`Step.span`).
        self.span = step.span(state) if self.in_graph and span else self.steps_per_call
        self._run = None
        if self.in_graph:
            self._run = step.runner(
                state, iterator, grouped=grouped, span=span, lasting=not counted
            )

    def call(self, n: int, begin: Callable[[], None]) -> tuple[Logs | None, int]:
        """Runs up to `n` steps (`begin` first, unless the data has run out)."""
        if self._run is not None:
            begin()
            logs, ran = self._run(n)
            return logs, (int(ran) if self.counted else n)
        batch = next(self.iterator, _END)
        if batch is _END:
            return None, 0
        begin()
        self.state, logs = self.step(self.state, batch)
        return logs, 1

    def retire(self) -> None:
        """Hands the iterator (and the graph function bound to it) to the background deleter."""
        refs = [self.iterator, self._run]
        self.iterator = self._run = None
        retire(refs)


def run_calls(
    feed: Feed,
    *,
    start: int = 0,
    limit: int | None = None,
    cap: Callable[[int], int | None] | None = None,
    hooks: tuple[BatchHook, LogsHook] = (no_begin, no_end),
) -> Iterator[tuple[int, Logs]]:
    """The loop over calls: runs `feed` from step `start` to `limit` (or the data's end).

    Each call runs `feed.span` steps (`steps_per_call`, or more where nothing
    looks at the state between them: `DataStream`), fewer to end at `limit` or at
    ``start + ... + cap(done)`` (the steps to the next due action). Around
    each call it fires the Keras batch hooks (`batch_hooks`), then yields
    ``(done, logs)``: the steps done so far and the call's logs. A caller
    that stops iterating ends the pass.
    """
    begin, end = hooks
    done = start
    while limit is None or done < limit:
        want = feed.span
        if limit is not None:
            want = min(want, limit - done)
        if cap is not None:
            want = min(want, cap(done) or want)
        logs, ran = feed.call(want, lambda done=done: begin(done))
        if not ran:
            return
        done += ran
        end(done - 1, logs)
        yield done, logs


class DataStream:
    """Every iterator of one pass or one run over `data`, checked, made, positioned, retired.

    Args:
      step, state: the step and state the feeds run.
      data: a `tf.data.Dataset` or an iterable of batches.
      run_wide: one iterator spans the run (a step budget, ``steps_per_epoch``)
        instead of one per window.
      repeat: a run-wide iterator goes over the data repeated as needed.
      whole_calls: no action cuts a call short, so an XLA step may be fed a
        call's batches in one element (`Step.grouped`).
      lengths: the first and last windows' steps (a run-wide iterator is
        grouped only if both are whole calls); None: until the data ends.
      span: nothing looks at the state between a call's steps (no batch hook
        listens): calls may run `Step.span` steps, at one step a call a guard
        window.
    """

    def __init__(
        self,
        step: StepFn,
        state: Any,
        data: Any,
        *,
        run_wide: bool = False,
        repeat: bool = False,
        whole_calls: bool = True,
        lengths: Sequence[int | None] = (),
        span: bool = False,
    ):
        self.step, self.state, self.source = step, state, data
        self.span = span
        self.run_wide = run_wide
        self.at = (0, 0, 0)
        dataset = isinstance(data, tf.data.Dataset)
        n = int(data.cardinality()) if dataset else tf.data.UNKNOWN_CARDINALITY
        endless = n == tf.data.INFINITE_CARDINALITY
        if dataset and run_wide and repeat and not endless:
            self.source = data.repeat()
        # Whether the data surely lasts to the limit (a window's steps); else a call's step
        # count is read back, to find the data's end.
        lasting = (endless or (repeat and n > 0)) if run_wide else n >= 0
        self.counted = not (dataset and lasting)
        self.groups: tf.data.Dataset | None = None
        if dataset and whole_calls and isinstance(step, LoopStep):
            k = step.steps_per_call
            if not (run_wide and any(steps is not None and steps % k for steps in lengths)):
                self.groups = step.grouped(state, self.source)
        self.repeat = repeat and not dataset  # a Python iterable cycled for a budget
        self._wide: Feed | None = None
        self._window: Feed | None = None

    def prepare(self) -> Any:
        """Runs the step's trace-time checks on the data's batches, before anything changes,
        by tracing the graph function the feeds will run (grouped or not); returns it.

        (None for a plain function or data: under a multi-worker strategy the checks run
        at the first step instead.)
        """
        if isinstance(self.step, LoopStep) and isinstance(self.source, tf.data.Dataset):
            data = self.source if self.groups is None else self.groups
            return self.step.check_data(
                self.state,
                data.element_spec,
                grouped=self.groups is not None,
                span=self.span,
                lasting=not self.counted,
            )
        return None

    def start_at(self, window: int, done: int, step: int) -> None:
        """The position the feeds start at: `done` steps into `window`, `step` in all (a
        resumed run's; its data is replayed there)."""
        self.at = (window, done, step)

    def _aligned(self, steps: int) -> bool:
        """Whether a position `steps` into an iterator falls between two groups."""
        return self.groups is not None and steps % self.step.steps_per_call == 0

    def _new(self, grouped: bool) -> Any:
        if not isinstance(self.source, tf.data.Dataset):
            return _cycle(self.source) if self.repeat else iter(self.source)
        source = self.groups if grouped else self.source
        return data_iterator(self.step, self.state, source)

    def _feed(self, skip: int, draws: int = 0) -> Feed:
        """A feed past `skip` batches of a new iterator, made after `draws` unread ones."""
        grouped = self._aligned(skip)
        for _ in range(draws):
            self._new(grouped)  # draws that epoch's reshuffle seeds, as the run did
        iterator = self._new(grouped)
        n = skip // self.step.steps_per_call if grouped else skip
        if n and int(_skip(iterator, tf.constant(n, tf.int32))) != n:
            raise CheckpointError(
                f"The training data ran out while replaying {skip} batches to the saved "
                "position: it is not the data the checkpointed run was trained on."
            )
        return Feed(
            self.step, self.state, iterator, grouped=grouped, counted=self.counted, span=self.span
        )

    def feed(self, window: int, state: Any) -> Feed:
        """The feed of `window` running from `state`, at the resumed position if the run
        resumes in that window."""
        first_window, first_done, first_step = self.at
        if self.run_wide:
            if self._wide is None:
                self._wide = self._feed(first_step)
            feed = self._wide
        else:
            if self._window is not None:
                self._window.retire()
            here = window == first_window
            self._window = self._feed(first_done if here else 0, first_window if here else 0)
            feed = self._window
        feed.state = state
        return feed

    def end_window(self) -> None:
        """After a window: its own iterator (not a run-wide one) is done."""
        if self._window is not None:
            self._window.retire()
            self._window = None

    def close(self) -> None:
        """Retires every iterator the stream still holds."""
        for feed in (self._window, self._wide):
            if feed is not None:
                feed.retire()
        self._window = self._wide = None


def run_pass(
    step: StepFn,
    state: Any,
    data: Any,
    *,
    hooks: tuple[BatchHook, LogsHook] = (no_begin, no_end),
) -> tuple[Any, Logs | None, int]:
    """Runs `step` over one pass of `data`; returns state, last logs, steps done.

    With a tfpure `Step` and a dataset, batches are pulled in-graph,
    `steps_per_call` per call (an XLA step's calls fed a call's batches at
    a time, `Step.grouped`); the number of steps a call ran is read back
    only when the dataset's length is unknown. Any other step is called
    once per batch in Python. `hooks` are Keras batch hooks.
    """
    stream = DataStream(step, state, data, span=hooks == (no_begin, no_end))
    feed = stream.feed(0, state)
    logs: Logs | None = None
    done = 0
    for done, logs in run_calls(feed, limit=num_batches(data), hooks=hooks):  # noqa: B007
        pass
    stream.close()
    return feed.state, logs, done
