"""One pass of a step over data: the engine under `fold`, `evaluate` and `fit_loop`.

`run_pass` pulls batches from a `tf.data` dataset inside the graph,
`steps_per_call` at a time, when the step is a tfpure `Step`, and calls any
other step once per batch in Python. Around each call it fires the batch
hooks of Keras callbacks, but only the hooks some callback listens to.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import keras
import tensorflow as tf

from tfpure.steps import Step, StepFn
from tfpure.stream import BatchHook, DataStream, LogsHook, no_begin, no_end, run_calls
from tfpure.types import Logs


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
    hooks: tuple[BatchHook, LogsHook] = (no_begin, no_end),
) -> tuple[Any, Logs | None, int]:
    """Runs `step` over one pass of `data`; returns state, last logs, steps done.

    With a tfpure `Step` and a dataset, batches are pulled in-graph,
    `steps_per_call` per call (an XLA step's calls fed a call's batches at
    a time, `Step._grouped`); the number of steps a call ran is read back
    only when the dataset's length is unknown. Any other step is called
    once per batch in Python. `hooks` are Keras batch hooks (`batch_hooks`).
    """
    stream = DataStream(step, state, data)
    feed = stream.feed(0, state)
    logs: Logs | None = None
    done = 0
    for done, logs in run_calls(feed, limit=num_batches(data), hooks=hooks):  # noqa: B007
        pass
    stream.close()
    return feed.state, logs, done


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
