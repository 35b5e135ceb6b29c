"""Names every module shares: the `Logs` alias and the one check of a count argument."""

from __future__ import annotations

from typing import Any

import tensorflow as tf

__all__ = ["Logs", "check_count"]

Logs = dict[str, tf.Tensor]
"""What a step returns beside the state: log name -> scalar tensor (``tp.Logs``)."""


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
