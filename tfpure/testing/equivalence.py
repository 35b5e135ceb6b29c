"""Equivalence assertions: the same training, run two ways, gives the same result.

Each runs twice from identically initialised states (`make_state()` is called
once per run) and compares every model, optimizer, metric and counter
variable, and the logs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfpure.compat import LossFunctionWrapper
from tfpure.state import TrainState
from tfpure.testing.properties import snapshot, state_variables

__all__ = [
    "assert_fused_matches_sequential",
    "assert_graph_matches_eager",
    "assert_step_matches_reference",
]


def _run(step: Callable[..., Any], state: Any, batches: Iterable[Any]) -> tuple[Any, list[Any]]:
    logs = []
    for batch in batches:
        state, out = step(state, batch)
        logs.append({k: np.asarray(v) for k, v in out.items()})
    return state, logs


@contextlib.contextmanager
def _eagerly() -> Iterator[None]:
    previous = tf.config.functions_run_eagerly()
    tf.config.run_functions_eagerly(True)
    try:
        yield
    finally:
        tf.config.run_functions_eagerly(previous)


def _compare(
    what: str,
    a: dict[str, np.ndarray],
    b: dict[str, np.ndarray],
    rtol: float,
    atol: float,
    labels: str = "graph - eager",
) -> list[str]:
    out = []
    if len(a) != len(b):
        return [f"{what}: {len(a)} variables against {len(b)}"]
    for (name, x), y in zip(a.items(), b.values(), strict=True):
        if x.dtype.kind in "fc":
            ok = np.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True)
        else:
            ok = np.array_equal(x, y)
        if not ok:
            delta = np.max(np.abs(x.astype("float64") - y.astype("float64")))
            out.append(f"{what} {name}: max |{labels}| = {delta:.3g}")
    return out


def _compare_states(
    a: TrainState, b: TrainState, rtol: float, atol: float, labels: str = "graph - eager"
) -> list[str]:
    """`_compare` over every variable group of two states."""
    groups_b = state_variables(b)
    return [
        problem
        for group, vs in state_variables(a).items()
        for problem in _compare(group, snapshot(vs), snapshot(groups_b[group]), rtol, atol, labels)
    ]


def assert_graph_matches_eager(
    make_state: Callable[[], TrainState],
    step: Callable[..., Any],
    batches: Sequence[Any],
    *,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    """Asserts that `step` gives the same variables and logs compiled and run eagerly.

    `make_state()` is called twice and must return identically initialised
    states (same weights, same seeds). One runs `step` over `batches` as
    compiled; the other under ``tf.config.run_functions_eagerly(True)``. Python
    state frozen into a graph at trace time (a counter, a list, a random draw
    made in Python) shows up as a difference.

    Raises:
      AssertionError: naming each variable or log entry that differs.

    Example:
      >>> import keras, numpy as np, tfpure as tp
      >>> from tfpure import testing as tpt
      >>> def make_state():
      ...     keras.utils.set_random_seed(0)
      ...     model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2),
      ...                               keras.layers.Dropout(0.5)])
      ...     return tp.TrainState.create(model=model, optimizer=keras.optimizers.Adam())
      >>> batches = [(np.ones((4, 3), "float32"), np.zeros((4, 2), "float32"))] * 3
      >>> tpt.assert_graph_matches_eager(make_state, tp.make_train_step("mse"), batches)
    """
    batches = list(batches)
    graph_state, graph_logs = _run(step, make_state(), batches)
    eager_state = make_state()
    with _eagerly():
        eager_state, eager_logs = _run(step, eager_state, batches)
    problems = _compare_states(graph_state, eager_state, rtol, atol)
    for i, (g, e) in enumerate(zip(graph_logs, eager_logs, strict=True)):
        if set(g) != set(e):
            problems.append(f"logs of batch {i}: keys {sorted(g)} vs {sorted(e)}")
        else:
            problems += _compare(f"logs of batch {i}", g, e, rtol, atol)
    if problems:
        raise AssertionError(
            "The compiled step and the same step run eagerly disagree:\n  "
            + "\n  ".join(problems[:20])
        )


def assert_fused_matches_sequential(
    make_state: Callable[[], TrainState],
    make_step: Callable[[int], Any],
    data: tf.data.Dataset,
    *,
    steps_per_call: int,
    epochs: int = 2,
    rtol: float = 0.0,
    atol: float = 0.0,
) -> None:
    """Asserts that fusing `steps_per_call` steps per graph call changes no result.

    Trains two identically initialised states (`make_state()` twice) with
    `fit_loop` for `epochs` epochs, validating on `data`: one with
    ``make_step(1)``, one with ``make_step(steps_per_call)``. Variables and the
    whole history must agree (bit for bit by default).

    Raises:
      AssertionError: naming what differs.

    Example:
      >>> import keras, tensorflow as tf, tfpure as tp
      >>> from tfpure import testing as tpt
      >>> def make_state():
      ...     keras.utils.set_random_seed(0)
      ...     model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
      ...     return tp.TrainState.create(model=model, optimizer=keras.optimizers.Adam())
      >>> data = tf.data.Dataset.from_tensor_slices((tf.ones((10, 3)), tf.ones((10, 1)))).batch(3)
      >>> tpt.assert_fused_matches_sequential(
      ...     make_state, lambda k: tp.make_train_step("mse", steps_per_call=k), data,
      ...     steps_per_call=3)
    """
    from tfpure.loop import fit_loop

    results = []
    for k in (1, steps_per_call):
        state = make_state()
        state, history = fit_loop(
            state, data, make_step(k), epochs=epochs, val_data=data, verbose=0
        )
        results.append((state, history))
    (one, one_history), (fused, fused_history) = results
    problems = _compare_states(one, fused, rtol, atol, "one - fused")
    if sorted(one_history) != sorted(fused_history):
        problems.append(f"history keys {sorted(one_history)} vs {sorted(fused_history)}")
    else:
        for name, values in one_history.items():
            if not np.allclose(values, fused_history[name], rtol=rtol, atol=atol):
                problems.append(f"history {name}: {values} vs {fused_history[name]}")
    if problems:
        raise AssertionError(
            f"steps_per_call={steps_per_call} differs from one step per call:\n  "
            + "\n  ".join(problems[:20])
        )


def _reference_loss(loss: Any) -> Any:
    """`loss` as `model.compile` would call it: ``fn(y_true, y_pred, sample_weight=)``."""
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        return loss
    if callable(loss):
        return LossFunctionWrapper(loss)
    raise TypeError(f"The reference step needs a Keras loss or fn(y_true, y_pred); got {loss!r}.")


def _reference_step(state: TrainState, loss: Any, batch: Any) -> None:
    """The tutorial's step, eagerly: what a training step of `state` must do to a batch."""
    x, y, sample_weight = (*batch, None)[:3] if isinstance(batch, tuple) else (batch, None, None)
    model, optimizer = state.model, state.optimizer
    with tf.GradientTape() as tape:
        y_pred = model(x, training=True)
        value = loss(y, y_pred, sample_weight=sample_weight)
        value += sum(model.losses)  # regularization, as in the tutorial
    grads = tape.gradient(value, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
    examples = tf.shape(tf.nest.flatten(x)[0])[0]
    for name, metric in state.metrics.items():
        if name == "loss":  # weighted by batch size, as Keras fit does
            metric.update_state(value, sample_weight=examples)
        else:
            metric.update_state(y, y_pred, sample_weight=sample_weight)
    state.step.assign_add(1)


def assert_step_matches_reference(
    make_state: Callable[[], TrainState],
    step: Callable[..., Any],
    loss: Any,
    batches: Sequence[Any],
    *,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    """Asserts that `step` trains a state as the tutorial's hand-written step does.

    `make_state()` is called twice and must return identically initialised
    states. One is trained by `step` over `batches`; the other by an
    independent reference, run eagerly: ``model(x, training=True)``, `loss`
    plus ``model.losses``, one ``apply_gradients``, each metric of
    ``state.metrics`` updated once with ``(y, y_pred, sample_weight)`` and the
    ``"loss"`` tracker with the batch loss weighted by the batch size (as
    Keras `fit` does), ``state.step`` counted. Every model, optimizer and
    metric *variable* is compared, so a metric updated twice is caught even
    when its result is unchanged, and a forgotten ``model.losses`` shows in
    the weights. `step` may be a `make_train_step` step or a `make_step` body
    over one state.

    Args:
      make_state: builds a fresh, identically initialised `TrainState`.
      step: ``state, logs = step(state, batch)``.
      loss: the loss the step should use: a Keras loss, its name, or
        ``fn(y_true, y_pred)`` (wrapped as `model.compile` wraps it).
      batches: ``(x, y)`` or ``(x, y, sample_weight)`` batches.
      rtol, atol: tolerance of the comparison (the reference runs eagerly:
        another graph, so float32 sums may be ordered otherwise).

    Raises:
      AssertionError: naming each variable that differs, or saying that
        `make_state` built two different states.

    Example:
      >>> import keras, numpy as np, tfpure as tp
      >>> from tfpure import testing as tpt
      >>> def make_state():
      ...     keras.utils.set_random_seed(0)
      ...     model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
      ...     return tp.TrainState.create(model=model, optimizer=keras.optimizers.Adam())
      >>> batches = [(np.ones((4, 3), "float32"), np.zeros((4, 2), "float32"))] * 3
      >>> tpt.assert_step_matches_reference(make_state, tp.make_train_step("mse"), "mse", batches)
    """
    batches = list(batches)
    reference_loss = _reference_loss(loss)
    stepped, reference = make_state(), make_state()
    problems = _compare_states(stepped, reference, 0.0, 0.0, "first - second")
    if problems:
        raise AssertionError(
            "make_state() built two different states (seed it inside, e.g. "
            "keras.utils.set_random_seed):\n  " + "\n  ".join(problems[:20])
        )
    for batch in batches:
        stepped, _ = step(stepped, batch)
        _reference_step(reference, reference_loss, batch)
    problems = _compare_states(stepped, reference, rtol, atol, "step - reference")
    if problems:
        raise AssertionError(
            "The step differs from the tutorial's step with the same loss:\n  "
            + "\n  ".join(problems[:20])
        )
