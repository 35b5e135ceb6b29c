"""Keras callbacks in tfpure's loops: the `CallbackList`, and the batch hooks worth calling.

`fit_loop` and `evaluate` drive ordinary Keras callbacks through
`keras.callbacks.CallbackList`, the object Keras' own `fit` uses; these
helpers build it and pick the batch hooks some callback listens to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras

__all__ = [
    "BatchHook",
    "LogsHook",
    "batch_hooks",
    "callback_list",
    "looks_at_steps",
    "no_begin",
    "no_end",
]

BatchHook = Callable[[int], None]
LogsHook = Callable[[int, Any], None]


def no_begin(index: int) -> None:
    del index


def no_end(index: int, logs: Any) -> None:
    del index, logs


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


def _listens(cb: keras.callbacks.Callback, names: tuple[str, ...]) -> bool:
    base = keras.callbacks.Callback
    return any(getattr(type(cb), name) is not getattr(base, name) for name in names)


def looks_at_steps(cbs: keras.callbacks.CallbackList) -> bool:
    """Whether a callback may look at the state after single training steps: one with
    a training batch hook, but Keras' progress bar (``verbose=1`` draws the bar at
    the end of each call, as Keras' `fit` does with ``steps_per_execution``; at
    ``verbose=2`` it only counts the batches).

    Example:
      >>> import keras
      >>> from tfpure.callbacks import callback_list, looks_at_steps
      >>> model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
      >>> [looks_at_steps(callback_list([], model, add_progbar=v > 0, verbose=v, epochs=1,
      ...                               steps=2)) for v in (0, 1, 2)]
      [False, False, False]
      >>> class Each(keras.callbacks.Callback):
      ...     def on_train_batch_end(self, batch, logs=None):
      ...         pass
      >>> looks_at_steps(callback_list([Each()], model, epochs=1, steps=2))
      True
    """
    begin, end = _LISTENERS["train"]
    return any(
        _listens(cb, begin + end) and type(cb) is not keras.callbacks.ProgbarLogger
        for cb in cbs.callbacks
    )


def batch_hooks(cbs: keras.callbacks.CallbackList, mode: str) -> tuple[BatchHook, LogsHook]:
    """The batch hooks to call for `mode`: none when no callback overrides them.

    Calling `CallbackList` hooks costs a thread-pool dispatch and a NumPy
    copy of the logs per call; with no callback listening (``verbose=0``,
    epoch-level callbacks only) the loop skips them.
    """

    def listens(names: tuple[str, ...]) -> bool:
        return any(_listens(cb, names) for cb in cbs.callbacks)

    begin_names, end_names = _LISTENERS[mode]
    begin = getattr(cbs, f"on_{mode}_batch_begin") if listens(begin_names) else no_begin
    end = getattr(cbs, f"on_{mode}_batch_end") if listens(end_names) else no_end
    return begin, end
