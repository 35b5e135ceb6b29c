"""Names every module shares: `Logs`, the `LoopStep` protocol, the one check of a count."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import tensorflow as tf

__all__ = ["LoopStep", "Logs", "StepFn", "check_count"]

Logs = dict[str, tf.Tensor]
"""What a step returns beside the state: log name -> scalar tensor (``tp.Logs``)."""


class StepFn(Protocol):
    """Anything a loop can drive: ``state, logs = step(state, batch)``.

    A tfpure `Step` is one; so is any plain Python function of that shape.

    Example:
      >>> import keras, tensorflow as tf, tfpure as tp
      >>> def count_examples(state, batch):  # a StepFn that trains nothing
      ...     return state, {"n": tf.shape(batch)[0]}
      >>> state, logs = tp.fold(count_examples, None, [tf.ones((3, 2)), tf.ones((5, 2))])
      >>> int(logs["n"])
      5
    """

    def __call__(self, state: Any, batch: Any, /) -> tuple[Any, Logs]: ...


@runtime_checkable
class LoopStep(Protocol):
    """What the loops ask of a compiled step beside ``step(state, batch)``: a `tp.Step`.

    A loop runs such a step's calls on a `tf.data` iterator inside the graph
    (`runner`), `steps_per_call` steps a call; any other step is called once
    per batch in Python.

    Example:
      >>> import tfpure as tp
      >>> from tfpure.types import LoopStep
      >>> isinstance(tp.make_train_step("mse"), LoopStep), isinstance(print, LoopStep)
      (True, False)
    """

    @property
    def steps_per_call(self) -> int: ...

    def span(self, state: Any) -> int: ...

    def runner(
        self,
        state: Any,
        iterator: Any,
        *,
        grouped: bool = False,
        span: bool = False,
        lasting: bool = False,
    ) -> Callable[[int | None], tuple[Logs, tf.Tensor]]: ...

    def grouped(self, state: Any, data: Any) -> Any: ...

    def check_data(
        self,
        state: Any,
        element_spec: Any,
        *,
        grouped: bool = False,
        span: bool = False,
        lasting: bool = False,
    ) -> Any: ...


def check_count(
    name: str,
    value: Any,
    *,
    optional: bool = False,
    integer: bool = True,
    minimum: int = 1,
    meaning: str = "",
) -> Any:
    """Returns `value` if it is an int >= `minimum` (or a number > 0 where not `integer`;
    or None where `optional`); else raises ValueError naming `name` and what was expected.
    Booleans are refused (``True`` is no count).

    Example:
      >>> from tfpure.types import check_count
      >>> check_count("epochs", 3)
      3
      >>> check_count("epochs", True)
      Traceback (most recent call last):
      ...
      ValueError: `epochs` must be an int >= 1; got True.
    """
    if value is None and optional:
        return value
    kinds = int if integer else int | float
    if (
        isinstance(value, bool)
        or not isinstance(value, kinds)
        or not (value >= minimum if integer else value > 0)
    ):
        expected = f"an int >= {minimum}" if integer else "a number > 0"
        expected = f"None or {expected}" if optional else expected
        raise ValueError(f"`{name}` must be {expected}{meaning}; got {value!r}.")
    return value
