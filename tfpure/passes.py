"""One pass of a step over data: the engine under `fold`, `evaluate` and `fit_loop`.

`run_pass` pulls batches from a `tf.data` dataset inside the graph,
`steps_per_call` at a time, when the step is a tfpure `Step`, and calls any
other step once per batch in Python. Around each call it fires the batch
hooks of Keras callbacks, but only the hooks some callback listens to.
"""

from __future__ import annotations

import atexit
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import keras
import tensorflow as tf

from tfpure.builtin import Logs
from tfpure.distribute import cluster_task, strategy_of
from tfpure.state import leaves
from tfpure.steps import Step, StepFn

BatchHook = Callable[[int], None]
LogsHook = Callable[[int, Any], None]


def no_begin(index: int) -> None:
    del index


def no_end(index: int, logs: Any) -> None:
    del index, logs


def never() -> bool:
    return False


_END = object()

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
    """Lets a finished epoch's data iterator be deleted off the training thread.

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


def check_data(data: Any, argument: str) -> None:
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
            f"{type(data).__name__}. For arrays, use "
            "tf.data.Dataset.from_tensor_slices((x, y)).batch(32)."
        )


def num_batches(data: Any) -> int | None:
    if isinstance(data, tf.data.Dataset):
        n = int(data.cardinality())
        return n if n >= 0 else None
    try:
        return len(data)
    except TypeError:
        return None


def run_pass(
    step: StepFn,
    state: Any,
    data: Any,
    *,
    iterator: Any = None,
    start: int = 0,
    max_steps: int | None = None,
    hooks: tuple[BatchHook, LogsHook] = (no_begin, no_end),
    on_call: Callable[[Any, int, Logs], None] | None = None,
    stop: Callable[[], bool] = never,
    cap: Callable[[int], int | None] | None = None,
    endless: bool = False,
    grouped: bool = False,
) -> tuple[Any, Logs | None, int]:
    """Runs `step` over `data` (or `iterator`); returns state, last logs, steps done.

    Steps are counted from `start` (a resumed epoch) up to `max_steps`. With a
    tfpure `Step` and a dataset, batches are pulled in-graph,
    `steps_per_call` per call, and ``cap(done)`` may cut a call short (to
    land on a checkpoint). The number of steps a call ran is read back only
    when it is not known beforehand (unknown cardinality, an iterator that
    may run out), so a known-size epoch needs no per-call host read.
    After each call's end hook, ``on_call(state, done, logs)`` runs (the
    training loop's position, actions and saves). When no call is cut short
    (no `cap`, the whole epoch), an XLA step's data is fed a call's batches
    at a time (`Step._grouped`); a given `iterator` is `grouped` if it is so.
    """
    begin, end = hooks
    logs: Logs | None = None
    done = start
    if iterator is None:
        in_graph = isinstance(data, tf.data.Dataset)
    else:  # a tf.data (or distributed) iterator, or a Python one (a repeated list)
        in_graph = hasattr(iterator, "get_next_as_optional")
    owned = iterator is None  # An iterator made here is retired here.
    if isinstance(step, Step) and in_graph:
        # Steps in the epoch, if known: then no call's step count is read back.
        known = num_batches(data) if iterator is None else None
        limit = known if max_steps is None else max_steps
        if iterator is None:
            whole = max_steps in (None, known) and (cap is None or cap(start) is None)
            groups = step._grouped(state, data) if whole and start == 0 else None
            grouped = groups is not None
            iterator = data_iterator(step, state, data if groups is None else groups)
        run = step._epoch(state, iterator, grouped)
        while limit is None or done < limit:
            begin(done)
            want = step.steps_per_call
            if limit is not None:
                want = min(want, limit - done)
            if cap is not None:
                want = min(want, cap(done) or want)
            out, ran = run(want)
            if known is None and not endless:
                ran = int(ran)
                if ran == 0:
                    break
            else:
                ran = want
            logs, done = out, done + ran
            end(done - 1, logs)
            if on_call is not None:
                on_call(state, done, logs)
            if stop():
                break
        if owned:
            refs = [iterator, run]
            del iterator, run
            retire(refs)
        return state, logs, done
    batches = iter(data) if iterator is None else iterator
    while max_steps is None or done < max_steps:
        batch = next(batches, _END)
        if batch is _END:
            break
        begin(done)
        state, logs = step(state, batch)
        done += 1
        end(done - 1, logs)
        if on_call is not None:
            on_call(state, done, logs)
        if stop():
            break
    if owned and isinstance(batches, tf.data.Iterator):
        refs = [batches]
        del batches
        retire(refs)
    return state, logs, done


def callback_list(
    callbacks: Sequence[keras.callbacks.Callback],
    model: keras.Model,
    **params: Any,
) -> keras.callbacks.CallbackList:
    callbacks = list(callbacks or ())
    for cb in callbacks:
        if not isinstance(cb, keras.callbacks.Callback):
            raise TypeError(
                "`callbacks` must hold keras.callbacks.Callback instances; got "
                f"{type(cb).__name__}."
            )
    return keras.callbacks.CallbackList(callbacks, model=model, **params)


# Which callback methods a batch hook reaches (Keras' train hooks fall back
# to the legacy `on_batch_*` methods).
_LISTENERS = {
    "train": (("on_train_batch_begin", "on_batch_begin"), ("on_train_batch_end", "on_batch_end")),
    "test": (("on_test_batch_begin",), ("on_test_batch_end",)),
}


def batch_hooks(cbs: keras.callbacks.CallbackList, mode: str) -> tuple[BatchHook, LogsHook]:
    """The batch hooks to call for `mode`: none when no callback overrides them.

    Calling `CallbackList` hooks costs a thread-pool dispatch and a NumPy
    copy of the logs per call; with no callback listening (``verbose=0``,
    epoch-level callbacks only) the loop skips them.
    """

    def listens(names: tuple[str, ...]) -> bool:
        base = keras.callbacks.Callback
        return any(
            getattr(type(cb), name) is not getattr(base, name)
            for cb in cbs.callbacks
            for name in names
        )

    begin_names, end_names = _LISTENERS[mode]
    begin = getattr(cbs, f"on_{mode}_batch_begin") if listens(begin_names) else no_begin
    end = getattr(cbs, f"on_{mode}_batch_end") if listens(end_names) else no_end
    return begin, end


def prepare(step: StepFn, state: Any, data: Any) -> None:
    """Runs a tfpure step's trace-time checks on `data`'s batches before anything changes.

    (Under a multi-worker strategy the checks run at the first step instead.)
    """
    if isinstance(step, Step) and isinstance(data, tf.data.Dataset):
        step._prepare(state, data.element_spec)


def data_iterator(step: StepFn, state: Any, data: tf.data.Dataset) -> Any:
    """An iterator over `data` for `step`, distributed if the state spans several workers.

    With a multi-worker strategy, `strategy.experimental_distribute_dataset`
    shards the data between workers and splits each global batch across the
    replicas (a ragged last batch too, some replicas possibly getting no
    example). In one process tfpure steps split the global batch in-graph
    (see `tfpure.graph`), so the iterator is an ordinary one.
    """
    if isinstance(step, Step):
        strategy = strategy_of(leaves(state))
        if cluster_task(strategy) is not None:
            return iter(strategy.experimental_distribute_dataset(data))
    return iter(data)
