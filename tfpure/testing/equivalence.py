"""Equivalence assertions: the same training, run two ways, gives the same result.

Each runs the same training two ways from identically initialised states
(`make_state()` is called once per run, and states that differ before any
step are refused) and compares every model, optimizer, metric and counter
variable, and the logs. Graph-vs-eager and the reference step widen each
variable's tolerance by its rounding band (see `assert_graph_matches_eager`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfpure.compat import LossFunctionWrapper
from tfpure.outputs import Route, select
from tfpure.state import TrainState
from tfpure.testing.properties import _state_groups, snapshot

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


def _snapshots(states: Any) -> dict[str, dict[str, np.ndarray]]:
    return {group: snapshot(vs) for group, vs in _state_groups(states).items()}


def _compare(
    what: str,
    a: dict[str, np.ndarray],
    b: dict[str, np.ndarray],
    rtol: float,
    atol: float,
    labels: str,
    band: dict[str, float] | None = None,
) -> list[str]:
    out = []
    if len(a) != len(b):
        return [f"{what}: {len(a)} variables against {len(b)}"]
    for (name, x), y in zip(a.items(), b.values(), strict=True):
        wider = (band or {}).get(name, 0.0)
        if x.dtype.kind in "fc":
            ok = np.allclose(x, y, rtol=rtol, atol=atol + wider, equal_nan=True)
        else:
            ok = np.array_equal(x, y)
        if not ok:
            delta = np.max(np.abs(x.astype("float64") - y.astype("float64")))
            out.append(
                f"{what} {name}: max |{labels}| = {delta:.3g}"
                + (f" (rounding band {wider:.3g})" if wider else "")
            )
    return out


def _compare_states(
    a: dict[str, dict[str, np.ndarray]],
    b: dict[str, dict[str, np.ndarray]],
    rtol: float,
    atol: float,
    labels: str,
    bands: dict[str, dict[str, float]] | None = None,
) -> list[str]:
    """`_compare` over every variable group of two states' snapshots."""
    return [
        problem
        for group, values in a.items()
        for problem in _compare(
            group, values, b[group], rtol, atol, labels, (bands or {}).get(group)
        )
    ]


def _fresh_states(make_state: Callable[[], Any], n: int) -> list[Any]:
    """`n` states from `make_state()`, refused unless identical (weights, slots, seeds)."""
    states = [make_state() for _ in range(n)]
    first = _snapshots(states[0])
    for other in states[1:]:
        problems = _compare_states(first, _snapshots(other), 0.0, 0.0, "first - second")
        if problems:
            raise AssertionError(
                "make_state() built two different states (build and seed them inside "
                "it, e.g. keras.utils.set_random_seed(0) first):\n  " + "\n  ".join(problems[:20])
            )
    return states


def _nudged(states: Any) -> Any:
    """`states` with every trainable weight moved one float away from zero."""
    if isinstance(states, TrainState):
        each = [states]
    else:
        each = states.values() if isinstance(states, Mapping) else states
    for state in each:
        for v in state.model.trainable_variables:
            x = v.numpy()
            if x.dtype.kind == "f":
                v.assign(x + np.spacing(x))
    return states


_BAND_NOTE = (
    "(rounding band: four times how far the same compiled run ends when every weight starts "
    "one float apart. A numerically zero gradient — a bias before BatchNorm, an "
    "attention key bias — has a wide band under Adam, whose update is about lr·sign(g).)"
)


def _bands(
    run: dict[str, dict[str, np.ndarray]], nudged: dict[str, dict[str, np.ndarray]]
) -> dict[str, dict[str, float]]:
    """Per variable (names of `run`; the states' variables pair by position)."""
    return {
        group: {
            name: 4.0 * float(np.max(np.abs(x - y.astype("float64")), initial=0.0))
            for (name, x), y in zip(values.items(), nudged[group].values(), strict=True)
            if x.dtype.kind == "f"
        }
        for group, values in run.items()
    }


def _rounding_bands(
    step: Callable[..., Any],
    state: Any,
    batches: list[Any],
    ran: dict[str, dict[str, np.ndarray]],
    rtol: float,
    atol: float,
) -> tuple[dict[str, dict[str, float]] | None, str]:
    """Bands from a run of `step` over `batches` from `state`, nudged; and a note.

    No bands if that run's figures (logs, metrics) differ from `ran`'s: a
    weight whose gradient is numerically zero moves no figure, while a step
    that keeps Python state between calls ends elsewhere on every run.
    """
    other, logs = _run(step, _nudged(state), batches)
    nudged = {**_snapshots(other), **_logs_snapshot(logs)}
    figures = {g: v for g, v in ran.items() if g.startswith("logs of") or g.endswith("metrics")}
    moved = _compare_states(figures, nudged, rtol, atol, "first - nudged")
    if moved:
        return None, (
            "(no rounding band: a third compiled run, from weights one float apart, "
            f"reached other figures — {moved[0]} — so the step does not repeat itself "
            "from run to run, e.g. it keeps Python state between calls.)"
        )
    return _bands(ran, nudged), _BAND_NOTE


def _logs_snapshot(logs: list[dict[str, np.ndarray]]) -> dict[str, dict[str, np.ndarray]]:
    return {f"logs of batch {i}": entry for i, entry in enumerate(logs)}


def assert_graph_matches_eager(
    make_state: Callable[[], Any],
    step: Callable[..., Any],
    batches: Sequence[Any],
    *,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    rounding_band: bool = True,
) -> None:
    """Asserts that `step` gives the same variables and logs compiled and run eagerly.

    `make_state()` must build identically initialised states (same weights,
    same seeds; refused otherwise, before any step runs): a `TrainState`, or
    several (a dict or tuple of them) for a `make_step` body. One runs `step`
    over `batches` as compiled; another under
    ``tf.config.run_functions_eagerly(True)``. Python state frozen into a
    graph at trace time (a counter, a list, a random draw made in Python)
    shows up as a difference.

    With `rounding_band`, a third, compiled run starts from weights moved one
    float each, and each variable's tolerance widens by four times how far that
    run ends from the first: the difference float rounding alone makes. A
    weight whose gradient is numerically zero (a conv bias before
    BatchNorm, an attention key bias) moves by rounding noise under Adam
    (its update is about ``lr * sign(g)``); its band says so, and a bug that
    changes what is computed still stands far outside the bands.

    Raises:
      AssertionError: naming each variable or log entry that differs (with
        its band), or saying that `make_state` built two different states.

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
    graph, eager, *nudged = _fresh_states(make_state, 3 if rounding_band else 2)
    graph, graph_logs = _run(step, graph, batches)
    with _eagerly():
        eager, eager_logs = _run(step, eager, batches)
    problems = [
        f"logs of batch {i}: keys {sorted(g)} vs {sorted(e)}"
        for i, (g, e) in enumerate(zip(graph_logs, eager_logs, strict=True))
        if set(g) != set(e)
    ]
    if not problems:
        ran = {**_snapshots(graph), **_logs_snapshot(graph_logs)}
        bands, note = None, ""
        if nudged:
            bands, note = _rounding_bands(step, nudged[0], batches, ran, rtol, atol)
        eagerly = {**_snapshots(eager), **_logs_snapshot(eager_logs)}
        problems = _compare_states(ran, eagerly, rtol, atol, "graph - eager", bands)
    if problems:
        raise AssertionError(
            "The compiled step and the same step run eagerly disagree:\n  "
            + "\n  ".join(problems[:20])
            + (f"\n{note}" if rounding_band and note else "")
        )


def assert_fused_matches_sequential(
    make_state: Callable[[], Any],
    make_step: Callable[[int], Any],
    data: tf.data.Dataset,
    *,
    steps_per_call: int,
    epochs: int = 2,
    eval_step: Any = None,
    rtol: float = 0.0,
    atol: float = 0.0,
) -> None:
    """Asserts that fusing `steps_per_call` steps per graph call changes no result.

    Trains two identically initialised states (`make_state()` twice) with
    `fit_loop` for `epochs` epochs: one with ``make_step(1)``, one with
    ``make_step(steps_per_call)``. Variables and the whole history must agree
    (bit for bit by default). Each epoch validates on `data` with `eval_step`;
    by default, a built-in train step's own evaluation, and none for a
    `tp.make_step` body (over one state or several).

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
    from tfpure.steps import Step

    results = []
    for k, state in zip((1, steps_per_call), _fresh_states(make_state, 2), strict=True):
        step = make_step(k)
        body = isinstance(step, Step) and step.kind == "custom"
        val_data = None if eval_step is None and body else data
        state, history = fit_loop(
            state, data, step, epochs=epochs, eval_step=eval_step, val_data=val_data, verbose=0
        )
        results.append((state, history))
    (one, one_history), (fused, fused_history) = results
    problems = _compare_states(_snapshots(one), _snapshots(fused), rtol, atol, "one - fused")
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
            continue
        # The output it reads; `metrics` ignore sample weights, `weighted_metrics` take them.
        route = state.routes.get(name, Route(weighted=True))
        weights = select(sample_weight, route) if route.weighted else None
        metric.update_state(select(y, route), select(y_pred, route), sample_weight=weights)
    state.step.assign_add(1)


def assert_step_matches_reference(
    make_state: Callable[[], TrainState],
    step: Callable[..., Any],
    loss: Any,
    batches: Sequence[Any],
    *,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    rounding_band: bool = True,
) -> None:
    """Asserts that `step` trains a state as the tutorial's hand-written step does.

    `make_state()` must return identically initialised states (refused
    otherwise). One is trained by `step` over `batches`; another by an
    independent reference, run eagerly: ``model(x, training=True)``, `loss`
    plus ``model.losses``, one ``apply_gradients``, each metric of
    ``state.metrics`` updated once with ``(y, y_pred)`` of its output (and
    ``sample_weight`` for a weighted metric, see ``state.routes``) and the
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
      rounding_band: widen each variable's tolerance by its rounding band,
        as `assert_graph_matches_eager` does (a third run of `step`).

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
    stepped, reference, *nudged = _fresh_states(make_state, 3 if rounding_band else 2)
    if not isinstance(stepped, TrainState):
        raise TypeError(
            "assert_step_matches_reference compares one TrainState with the tutorial's "
            f"step; make_state() built {type(stepped).__name__}."
        )
    stepped, logs = _run(step, stepped, batches)
    for batch in batches:
        _reference_step(reference, reference_loss, batch)
    ran, bands, note = _snapshots(stepped), None, ""
    if nudged:
        bands, note = _rounding_bands(
            step, nudged[0], batches, {**ran, **_logs_snapshot(logs)}, rtol, atol
        )
    problems = _compare_states(ran, _snapshots(reference), rtol, atol, "step - reference", bands)
    if problems:
        raise AssertionError(
            "The step differs from the tutorial's step with the same loss:\n  "
            + "\n  ".join(problems[:20])
            + (f"\n{note}" if note else "")
        )
