"""Counting traces: does a step compile once, or on every batch?

Works on any step callable, not only tfpure's: it finds every `tf.function`
the step can reach — the step itself, functions it closes over, names it
calls from its module, attributes and ``@tf.function`` methods of objects it
is bound to, tfpure `Step`s —
and sums their tracing counts, including functions created while it runs.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import keras
import tensorflow as tf

__all__ = ["assert_no_retrace", "count_traces"]

# Objects not searched for functions: big, and holding no step code.
_OPAQUE = (types.ModuleType, type, keras.layers.Layer, keras.optimizers.Optimizer, tf.Variable)


def _class_members(cls: type) -> Iterator[tuple[str, Any]]:
    """Attributes a class and its bases (not `object`) define, nearest first."""
    seen: set[str] = set()
    for klass in cls.__mro__[:-1]:
        for name, member in vars(klass).items():
            if name not in seen:
                seen.add(name)
                yield name, member


def _counts(root: Any, depth: int = 5) -> dict[int, tuple[Any, int]]:
    """Every object reachable from `root` that reports its traces, with its count."""
    found: dict[int, tuple[Any, int]] = {}
    seen: set[int] = set()

    def visit(obj: Any, depth: int) -> None:
        if obj is None or depth < 0 or id(obj) in seen or isinstance(obj, _OPAQUE):
            return
        seen.add(id(obj))
        count = getattr(obj, "experimental_get_tracing_count", None)
        if callable(count) and not isinstance(obj, type):
            found[id(obj)] = (obj, count())  # a tf.function or a tfpure Step
            return
        if inspect.ismethod(obj):
            visit(obj.__func__, depth)
            visit(obj.__self__, depth - 1)
        elif inspect.isfunction(obj):
            for cell in obj.__closure__ or ():
                with contextlib.suppress(ValueError):  # an empty cell
                    visit(cell.cell_contents, depth - 1)
            for name in obj.__code__.co_names:
                visit(obj.__globals__.get(name), depth - 1)
            visit(getattr(obj, "__wrapped__", None), depth - 1)
        elif isinstance(obj, functools.partial):
            for part in (obj.func, *obj.args, *obj.keywords.values()):
                visit(part, depth - 1)
        elif isinstance(obj, list | tuple | set | frozenset):
            for item in obj:
                visit(item, depth - 1)
        elif isinstance(obj, dict):
            for item in obj.values():
                visit(item, depth - 1)
        elif hasattr(obj, "__dict__"):
            for item in vars(obj).values():
                visit(item, depth - 1)
            for name, member in _class_members(type(obj)):
                if name == "__call__" and inspect.isfunction(member):
                    visit(member, depth - 1)  # a callable object's own code
                elif hasattr(member, "experimental_get_tracing_count"):
                    # A @tf.function method: each instance gets its own bound function.
                    visit(getattr(obj, name), depth - 1)

    visit(root, depth)
    return found


@contextlib.contextmanager
def count_traces(step: Callable[..., Any]) -> Iterator[Callable[[], int]]:
    """Counts the traces of every `tf.function` reachable from `step` inside the block.

    Yields a function returning the traces so far. Functions first reached
    during the block (created lazily, as a tfpure `Step` does per state) count
    from zero.

    Example:
      >>> import tensorflow as tf
      >>> from tfpure import testing as tpt
      >>> @tf.function
      ... def inner(x):
      ...     return x * 2
      >>> def step(x):
      ...     return inner(x)
      >>> with tpt.count_traces(step) as traces:
      ...     for n in (1, 2, 3):
      ...         _ = step(tf.ones([n]))
      >>> traces()
      3
    """
    start = _counts(step)
    yield lambda: sum(n for _, n in _traces_since(step, start))


def _traces_since(step: Callable[..., Any], start: dict[int, tuple[Any, int]]) -> list:
    """Each function `step` reaches now, with its traces since `start` (new ones from 0)."""
    return [(f, count - start.get(key, (None, 0))[1]) for key, (f, count) in _counts(step).items()]


def assert_no_retrace(
    step: Callable[..., Any], state: Any, batches: Iterable[Any], *, max_traces: int = 2
) -> None:
    """Asserts that running `step` over `batches` traces at most `max_traces` times.

    Counts the traces of every `tf.function` the step reaches (see
    `count_traces`), so it works on any ``state, logs = step(state, batch)``
    callable — a function, a closure, a method of a trainer class whose
    ``@tf.function`` methods it calls — and only traces made during the check
    count. A tfpure step traces once for all batch sizes; a hand-written
    `tf.function` typically twice (the first shape, then a relaxed one).

    Raises:
      AssertionError: with the number of traces seen, and which functions traced.

    Example:
      >>> import keras, numpy as np, tfpure as tp
      >>> from tfpure import testing as tpt
      >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
      >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())
      >>> batches = [(np.ones((n, 3), "float32"), np.ones((n, 1), "float32")) for n in (4, 3, 2, 1)]
      >>> tpt.assert_no_retrace(tp.make_train_step("mse"), state, batches, max_traces=1)
    """
    n = 0
    start = _counts(step)
    for batch in batches:
        state, _ = step(state, batch)
        n += 1
    since = _traces_since(step, start)
    if not since:
        raise TypeError(
            f"{step!r} reaches no tf.function: there is nothing whose traces could be counted."
        )
    traced = {getattr(f, "__name__", repr(f)): n for f, n in since}
    seen = sum(traced.values())
    if seen > max_traces:
        raise AssertionError(
            f"The step traced {seen} times over {n} batches (allowed {max_traces}; traces "
            f"per function: {traced}): a Python value or a changing shape enters a "
            "signature. Pass tensors, or let shapes relax (tf.function(reduce_retracing=True))."
        )
