"""`tfpure.bench`: benchmark your own training step, eager vs graph vs fused vs XLA vs Keras.

`compare` builds a fresh state per variant (the same step run eagerly, as a
graph, fused ``steps_per_call`` at a time, under XLA, and Keras ``fit`` on the
same model, loss and optimizer), runs the variants interleaved round by round
in one process (a busy machine slows all of them alike) and returns a
`BenchResult`: seconds per step per round, medians, minimums, paired ratios,
a Markdown table and a chart. Every variant is driven by its real loop
(`tfpure.fit_loop` with a step budget, or Keras ``fit`` with
``steps_per_epoch``) and timed from the epoch's begin to its end, so what a
loop does once per run (setting up, creating and tearing down the data
iterator) is kept out of the step time and reported on its own.

From a shell::

    python -m tfpure.bench mymodule:make_state mymodule:make_data --loss mse
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import inspect
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import keras
import tensorflow as tf

from tfpure._version import __version__
from tfpure.auto import CANDIDATE_STEPS
from tfpure.batch import required_positional
from tfpure.loop import fit_loop
from tfpure.outputs import Route
from tfpure.state import TrainState, leaves
from tfpure.steps import AutoStep, Step, make_step, make_train_step
from tfpure.types import check_count

__all__ = ["VARIANTS", "BenchResult", "Variant", "compare", "machine", "main", "plot"]

# A hand-written loop: ``runner = make(state, data)``; ``runner(n)`` runs n steps.
Runner = Callable[[int], None]


@attrs.frozen
class Variant:
    """One way of running a step that `compare` measures.

    Attributes:
      steps_per_call: steps fused into one call; None: `compare`'s `steps_per_call`;
        ``"auto"``: chosen by timing, as `make_train_step` chooses it (`tfpure.auto`:
        the choice is made in the warm-up round; `BenchResult.chosen` says what won).
      jit_compile: compile the step with XLA; ``"auto"``: chosen by timing.
      eager: run the step eagerly (``tf.config.run_functions_eagerly``, or
        Keras' ``run_eagerly``).
      keras: Keras ``fit`` on the state's model, compiled with the step's loss,
        the state's optimizer and metrics (built-in train steps on one state).
      nonfinite: the non-finite guard of tfpure steps (``"raise"``, ``"skip"``,
        None); ``"step"``: as the step given to `compare` has it.
      strategy: a ``tf.distribute.Strategy`` whose scope the state is made in.
      slow: runs an eighth of the steps per round (an eager variant).
      custom: a hand-written loop instead: ``runner = custom(state, data)``,
        ``runner(n)`` runs n steps (timed around the call, so it should keep
        its iterator between calls; or, if it returns a Python float, that many
        seconds are its steps', e.g. a `fit_loop` window's from its begin to its
        end, and the rest of the call is reported outside them).

    Example:
      >>> import tfpure as tp
      >>> tp.bench.VARIANTS["xla"]
      Variant(steps_per_call=1, jit_compile=True, eager=False, keras=False, ...)
      >>> tp.bench.Variant(nonfinite=None).steps_per_call is None
      True
    """

    steps_per_call: int | str | None = None
    jit_compile: bool | str = False
    eager: bool = False
    keras: bool = False
    nonfinite: str | None = "step"
    strategy: Any = None
    slow: bool = False
    custom: Callable[[Any, tf.data.Dataset], Runner] | None = None


VARIANTS: dict[str, Variant] = {
    "eager": Variant(steps_per_call=1, eager=True, slow=True),
    "graph": Variant(steps_per_call=1),
    "fused": Variant(),
    "xla": Variant(steps_per_call=1, jit_compile=True),
    "keras_fit": Variant(steps_per_call=1, keras=True),
    "keras_fit_fused": Variant(keras=True),
    "keras_fit_xla": Variant(steps_per_call=1, keras=True, jit_compile=True),
}
DEFAULT_VARIANTS = ("eager", "graph", "fused", "xla", "keras_fit")


def machine() -> dict[str, str]:
    """The CPU, core count and versions a result was measured with.

    Example:
      >>> import tfpure as tp
      >>> sorted(tp.bench.machine())
      ['cores', 'cpu', 'keras', 'platform', 'python', 'tensorflow', 'tfpure']
    """
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "tfpure": __version__,
        "platform": platform.platform(),
    }


@attrs.frozen
class BenchResult:
    """What `compare` measured: per-round seconds per step of each variant.

    Attributes:
      rounds: variant name -> seconds per step in each measured round.
      steps: variant name -> steps run per round (what the times divide by).
      outside: variant name -> seconds per round spent outside the steps
        (loop set-up, data iterator creation and teardown); empty for a
        hand-written loop, which is timed around its call.
      skipped: variant name -> why it was not measured.
      steps_per_call: the fused variants' steps per call.
      warmup: rounds run (and discarded) before measuring: tracing, XLA
        compilation and caches.
      machine: see `machine`.
      title: what was measured (charts and tables name it).
      families: variant name -> "tfpure", "Keras fit" or "hand-written" (chart colours).
      chosen: an ``"auto"`` variant's name -> the ``(jit_compile, steps_per_call)`` it
        chose and ran.

    Example:
      >>> from tfpure.bench import BenchResult
      >>> r = BenchResult(rounds={"graph": (2e-3, 1e-3, 3e-3), "fused": (1e-3, 1e-3, 1e-3)},
      ...                 steps={"graph": 64, "fused": 64})
      >>> r.median["graph"], r.minimum["graph"], r.paired("graph", "fused")
      (0.002, 0.001, 2.0)
    """

    rounds: Mapping[str, tuple[float, ...]]
    steps: Mapping[str, int]
    outside: Mapping[str, tuple[float, ...]] = attrs.field(factory=dict)
    skipped: Mapping[str, str] = attrs.field(factory=dict)
    steps_per_call: int = 16
    warmup: int = 1
    machine: Mapping[str, str] = attrs.field(factory=dict)
    title: str = ""
    families: Mapping[str, str] = attrs.field(factory=dict)
    chosen: Mapping[str, tuple[bool, int]] = attrs.field(factory=dict)

    @property
    def variants(self) -> tuple[str, ...]:
        """The measured variants, in the order they ran."""
        return tuple(self.rounds)

    @property
    def median(self) -> dict[str, float]:
        """Median seconds per step of each variant."""
        return {name: statistics.median(r) for name, r in self.rounds.items()}

    @property
    def minimum(self) -> dict[str, float]:
        """Best round's seconds per step of each variant (delays only ever add time)."""
        return {name: min(r) for name, r in self.rounds.items()}

    def paired(self, a: str, b: str) -> float:
        """Median over rounds of ``a / b`` within each round.

        The two variants ran seconds apart in each round, so a slowdown of
        the machine lasting a round cancels in the ratio.

        Example:
          >>> from tfpure.bench import BenchResult
          >>> r = BenchResult(rounds={"a": (2.0, 9.0, 3.0), "b": (1.0, 3.0, 2.0)},
          ...                 steps={"a": 1, "b": 1})
          >>> r.paired("a", "b")  # median of 2, 3 and 1.5
          2.0
        """
        for name in (a, b):
            if name not in self.rounds:
                raise KeyError(f"No variant {name!r} was measured; measured: {self.variants}.")
        return statistics.median(x / y for x, y in zip(self.rounds[a], self.rounds[b], strict=True))

    def to_markdown(self, reference: str | None = None) -> str:
        """A table of every variant; ratios are paired, against `reference` (default: "graph").

        Example:
          >>> from tfpure.bench import BenchResult
          >>> r = BenchResult(rounds={"graph": (2e-3, 3e-3), "fused": (1e-3, 1e-3)},
          ...                 steps={"graph": 64, "fused": 64})
          >>> print(r.to_markdown())  # doctest: +NORMALIZE_WHITESPACE
          2 rounds after 1 warm-up, variants interleaved round by round; fused variants run
          16 steps per call.
          <BLANKLINE>
          | variant | ms/step, median | ms/step, min | ms/step, max | steps/round | / graph (paired)
          | outside the steps, ms/round |
          |---|---:|---:|---:|---:|---:|---:|
          | graph | 2.500 | 2.000 | 3.000 | 64 | 1.00 | — |
          | fused | 1.000 | 1.000 | 1.000 | 64 | 0.42 | — |
          <BLANKLINE>
          Outside the steps: ...
        """
        if reference not in self.rounds:
            reference = "graph" if "graph" in self.rounds else self.variants[0]
        n = len(next(iter(self.rounds.values())))
        title = f"{self.title}: " if self.title else ""
        head = (
            f"{title}{n} round{'s' if n != 1 else ''} after {self.warmup} warm-up, "
            "variants interleaved round by round; fused variants run "
            f"{self.steps_per_call} steps per call."
        )
        lines = [
            head,
            "",
            f"| variant | ms/step, median | ms/step, min | ms/step, max | steps/round "
            f"| / {reference} (paired) | outside the steps, ms/round |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in self.rounds.items():
            outside = self.outside.get(name)
            label = name
            if name in self.chosen:
                jit, k = self.chosen[name]
                label = f"{name} (chose jit_compile={jit}, steps_per_call={k})"
            lines.append(
                f"| {label} | {statistics.median(r) * 1e3:.3f} | {min(r) * 1e3:.3f} "
                f"| {max(r) * 1e3:.3f} | {self.steps[name]} "
                f"| {self.paired(name, reference):.2f} "
                f"| {'—' if not outside else f'{statistics.median(outside) * 1e3:.1f}'} |"
            )
        for name, why in self.skipped.items():
            lines.append(f"| {name} | skipped: {why} | | | | | |")
        lines += [
            "",
            "Outside the steps: per round, the loop's set-up and the data iterator's creation "
            "and teardown, not in the step times (— : a hand-written loop, timed around its call).",
        ]
        if self.machine:
            lines += ["", "Machine: " + ", ".join(f"{k} {v}" for k, v in self.machine.items())]
        return "\n".join(lines) + "\n"

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Writes a chart of the medians with each variant's min-max spread (see `plot`).

        Example:
          >>> import os, tempfile
          >>> from tfpure.bench import BenchResult
          >>> r = BenchResult(rounds={"graph": (2e-3, 3e-3)}, steps={"graph": 64})
          >>> path = os.path.join(tempfile.mkdtemp(), "chart.png")
          >>> r.plot(path)
          >>> os.path.getsize(path) > 0
          True
        """
        plot({self.title or "step": self}, path)


def _family(variant: Variant) -> str:
    if variant.custom is not None:
        return "hand-written"
    return "Keras fit" if variant.keras else "tfpure"


_COLOURS = {"tfpure": "#d62728", "Keras fit": "#7f7f7f", "hand-written": "#1f77b4"}


def _panel(ax: Any, title: str, result: BenchResult, rows: list[str]) -> set[str]:
    """Draws one result on `ax` (a row for each of `rows`); returns the families drawn."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    seen: set[str] = set()
    names = [n for n in rows if n in result.rounds]
    ys = [rows.index(n) for n in names]
    med = [result.median[n] * 1e3 for n in names]
    low = [m - result.minimum[n] * 1e3 for m, n in zip(med, names, strict=True)]
    high = [max(result.rounds[n]) * 1e3 - m for m, n in zip(med, names, strict=True)]
    colours = []
    for n in names:
        family = result.families.get(n, "tfpure")
        seen.add(family)
        colours.append(_COLOURS.get(family, "#2ca02c"))
    log = max(med) / max(min(med), 1e-12) > 20
    if log:
        ax.scatter(med, ys, color=colours, zorder=3)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.grid(axis="x", which="major", alpha=0.3)
    else:
        ax.barh(ys, med, color=colours, zorder=2)
        ax.set_xlim(0, max(m + h for m, h in zip(med, high, strict=True)) * 1.3)
    ax.errorbar(med, ys, xerr=[low, high], fmt="none", ecolor="black", capsize=3, zorder=4)
    for y, m, h in zip(ys, med, high, strict=True):
        x = (m + h) * (1.08 if log else 1.0)
        ax.annotate(f" {m:.3g}", (x, y), va="center", fontsize=8)
    if log:  # Room for the last label inside the frame.
        lo, hi = ax.get_xlim()
        ax.set_xlim(lo, hi * 3)
    for y, n in enumerate(rows):
        if n not in result.rounds:
            ax.annotate(
                " not measured",
                (0, y),
                xycoords=("axes fraction", "data"),
                va="center",
                fontsize=8,
                color="#555555",
            )
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_yticks(range(len(rows)), rows)
    n = len(next(iter(result.rounds.values())))
    scale = ", log scale" if log else ""
    ax.set_xlabel(
        f"ms per step{scale} (lower is better)\nmedian of {n} rounds; whiskers: min to max"
    )
    ax.set_title(title)
    return seen


def plot(results: Mapping[str, BenchResult], path: str | os.PathLike[str]) -> None:
    """Writes one chart panel per result: median ms per step, whiskers from min to max.

    A panel whose values span more than 20 times uses a logarithmic axis with
    plain-number ticks (and dots, not bars, whose lengths would not be
    proportional). Colours tell tfpure, Keras fit and hand-written loops apart
    (`BenchResult.families`).

    Raises:
      ImportError: matplotlib is not installed (``pip install "tfpure[bench]"``).

    Example:
      >>> import os, tempfile
      >>> from tfpure.bench import BenchResult, plot
      >>> small = BenchResult(rounds={"graph": (1e-3, 2e-3)}, steps={"graph": 64})
      >>> big = BenchResult(rounds={"graph": (0.1, 0.2), "xla": (0.05, 0.06)},
      ...                   steps={"graph": 16, "xla": 16})
      >>> path = os.path.join(tempfile.mkdtemp(), "chart.png")
      >>> plot({"small MLP": small, "big MLP": big}, path)  # rows aligned across panels
      >>> os.path.getsize(path) > 0
      True
    """
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError('tfpure.bench.plot needs matplotlib: pip install "tfpure[bench]".') from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    # Every panel lists the same rows (the union, in order), so panels read across.
    rows = list(dict.fromkeys(name for r in results.values() for name in r.rounds))
    fig, axes = plt.subplots(
        1, len(results), figsize=(6.5 * len(results), 2.0 + 0.42 * len(rows)), squeeze=False
    )
    seen: set[str] = set()
    for ax, (title, result) in zip(axes[0], results.items(), strict=True):
        seen |= _panel(ax, title, result, rows)
    handles = [
        Line2D([], [], marker="s", linestyle="", color=_COLOURS.get(f, "#2ca02c"), label=f)
        for f in _COLOURS
        if f in seen
    ]
    height = fig.get_figheight()
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=len(handles) + 1,
        fontsize=8,
        frameon=False,
    )
    first = next(iter(results.values()))
    m = first.machine
    if m:
        fig.suptitle(
            f"{m.get('cpu', '')}, {m.get('cores', '?')} cores, TF {m.get('tensorflow', '?')}, "
            f"Keras {m.get('keras', '?')}",
            fontsize=9,
        )
    fig.tight_layout(rect=(0, 0.4 / height, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- measuring -------------------------------------------------------------------------


class _EpochTimer(keras.callbacks.Callback):
    """Times the epoch: from ``on_epoch_begin`` to ``on_epoch_end`` (the loops' steps)."""

    def __init__(self) -> None:
        super().__init__()
        self.begin = self.end = 0.0

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.begin = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.end = time.perf_counter()


def _as_step(loss_or_fn: Any, states: Any) -> Step:
    """The step `compare` varies: a `Step` as given; a body over several states, or a
    callable whose first parameter is ``state``/``states``, as `make_step`; else a loss."""
    if isinstance(loss_or_fn, Step):
        if loss_or_fn.kind == "eval":
            raise ValueError("`loss_or_fn` is an evaluation step; give a training step or loss.")
        return loss_or_fn
    several = not isinstance(states, TrainState)
    if callable(loss_or_fn) and not isinstance(loss_or_fn, keras.losses.Loss):
        try:
            first = next(iter(inspect.signature(loss_or_fn).parameters), "")
        except (TypeError, ValueError):
            first = ""
        if several or first in ("state", "states"):
            return make_step(loss_or_fn)
    if several:
        raise TypeError(
            "`make_state()` returned several states, so `loss_or_fn` must be a step body "
            f"fn(states, batch) -> (states, logs) or a tfpure Step; got {loss_or_fn!r}."
        )
    if required_positional(loss_or_fn) == 2 and not isinstance(loss_or_fn, keras.losses.Loss):
        # fn(y_true, y_pred): a body fn(state, batch) takes two arguments too.
        return make_train_step(_taken_for_a_loss(loss_or_fn))
    return make_train_step(loss_or_fn)


def _taken_for_a_loss(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn`, read as a loss; failing as one, it says how to pass a step body instead."""

    @functools.wraps(fn)
    def loss(*args: Any, **kwargs: Any) -> Any:
        try:
            return tf.convert_to_tensor(fn(*args, **kwargs))
        except Exception as err:
            name = getattr(fn, "__name__", repr(fn))
            raise TypeError(
                f"tp.bench.compare read {name!r} as a loss fn(y_true, y_pred) (its first "
                "parameter is not named `state` or `states`, and make_state() returned one "
                f"state), and calling it as one failed: {type(err).__name__}: {err} -- if it "
                f"is a step body, pass tp.make_step({name})."
            ) from err

    return loss


def _keras_blocker(step: Step, states: Any) -> str | None:
    """Why Keras `fit` cannot run what `step` runs, or None."""
    if step.kind != "train":
        return "a user-written step has no Keras compile equivalent"
    if not isinstance(states, TrainState):
        return "Keras fit trains one model"
    if step.spec.model_loss is step.spec.loss:
        return "a full-control (model, batch, training) loss has no Keras compile equivalent"
    if step.spec.grad_transform is not None:
        return "Keras fit has no grad_transform"
    return None


def _tfpure_step(step: Step, variant: Variant, k: int) -> Step | AutoStep:
    """`step` with the variant's options (an `AutoStep` for an ``"auto"`` one)."""
    guard = {} if variant.nonfinite == "step" else {"nonfinite": variant.nonfinite}

    def make(jit_compile: bool, steps_per_call: int) -> Step:
        return Step(
            attrs.evolve(step.spec, steps_per_call=steps_per_call, jit_compile=jit_compile, **guard)
        )

    jit, per_call = variant.jit_compile, variant.steps_per_call or k
    if "auto" in (jit, per_call):
        return AutoStep(make, kind=step.spec.kind, jit_compile=jit, steps_per_call=per_call)
    return make(jit, per_call)


def _tfpure_runner(mine: Step | AutoStep, variant: Variant, states: Any, data: Any) -> Callable:
    timer = _EpochTimer()

    def run(n: int) -> float:
        eager = contextlib.ExitStack()
        if variant.eager:
            eager.callback(tf.config.run_functions_eagerly, tf.config.functions_run_eagerly())
            tf.config.run_functions_eagerly(True)
        with eager:
            fit_loop(states, data, mine, steps=n, callbacks=[timer], verbose=0)
        return timer.end - timer.begin

    return run


def _keras_runner(step: Step, variant: Variant, k: int, state: TrainState, data: Any) -> Callable:
    model = state.model
    scope = variant.strategy.scope() if variant.strategy is not None else contextlib.nullcontext()
    named = [(m, state.routes.get(n, Route())) for n, m in state.metrics.items() if n != "loss"]
    with scope:
        model.compile(
            optimizer=state.optimizer,
            loss=step.spec.loss,
            loss_weights=step.spec.loss_weights,
            metrics=[m for m, route in named if not route.weighted],
            weighted_metrics=[m for m, route in named if route.weighted],
            steps_per_execution=variant.steps_per_call or k,
            jit_compile=variant.jit_compile,
            run_eagerly=variant.eager,
        )
    if int(data.cardinality()) != tf.data.INFINITE_CARDINALITY:
        data = data.repeat()
    timer = _EpochTimer()

    def run(n: int) -> float:
        model.fit(data, epochs=1, steps_per_epoch=n, verbose=0, callbacks=[timer], shuffle=False)
        return timer.end - timer.begin

    return run


def _timed_around(runner: Runner) -> Callable[[int], float | None]:
    """A hand-written loop is timed around its call, unless it returns the seconds its
    steps took (a Python float: the rest of the call is then reported outside the steps;
    anything else it returns is ignored)."""

    def run(n: int) -> float | None:
        inside = runner(n)
        return inside if type(inside) is float else None

    return run


def _steps_for(variant: Variant, steps: int, k: int) -> int:
    per_call = variant.steps_per_call or (1 if variant.custom is not None else k)
    if per_call == "auto":  # whole calls for every candidate
        per_call = max(CANDIDATE_STEPS)
    n = max(1, steps // 8) if variant.slow else steps
    return max(per_call, n // per_call * per_call)


def _default_steps(data: tf.data.Dataset, k: int) -> int:
    n = int(data.cardinality())
    if n < 0:
        return 4 * k
    return max(k, n // k * k)


def _variants(variants: Sequence[str] | Mapping[str, Variant]) -> dict[str, Variant]:
    if isinstance(variants, Mapping):
        chosen = dict(variants)
    else:
        if isinstance(variants, str):
            variants = (variants,)
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise ValueError(
                f"Unknown variant(s) {unknown}; known: {sorted(VARIANTS)} (or pass a dict of "
                "name -> tfpure.bench.Variant)."
            )
        chosen = {v: VARIANTS[v] for v in variants}
    for name, v in chosen.items():
        if not isinstance(v, Variant):
            raise TypeError(f"variants[{name!r}] must be a tfpure.bench.Variant; got {v!r}.")
        if "auto" in (v.jit_compile, v.steps_per_call) and (v.keras or v.custom or v.eager):
            raise ValueError(
                f"variants[{name!r}]: 'auto' chooses a tfpure step's configuration; a Keras, "
                "hand-written or eager variant has none to choose."
            )
    if not chosen:
        raise ValueError("`variants` is empty: name at least one variant to measure.")
    return chosen


def compare(
    make_state: Callable[[], Any],
    loss_or_fn: Any,
    data: tf.data.Dataset,
    *,
    variants: Sequence[str] | Mapping[str, Variant] = DEFAULT_VARIANTS,
    steps_per_call: int = 16,
    rounds: int = 5,
    warmup: int = 1,
    steps: int | None = None,
    title: str = "",
) -> BenchResult:
    """Measures seconds per training step of `variants`, interleaved round by round.

    Each variant gets its own state from ``make_state()`` and its own step:
    ``"eager"`` (run eagerly, an eighth of the steps), ``"graph"`` (one step
    per call), ``"fused"`` (`steps_per_call` per call), ``"xla"``
    (``jit_compile=True``), ``"keras_fit"`` (Keras ``fit`` on the state's
    model compiled with the same loss, optimizer and metrics; skipped with a
    note for user-written steps), ``"keras_fit_fused"``
    (``steps_per_execution=steps_per_call``), ``"keras_fit_xla"``; or a dict
    of name -> `Variant` of your own (no guard, a strategy, a hand-written
    loop). After `warmup` rounds (tracing, compiling) each of `rounds` rounds
    runs every variant once, `steps` steps each (a multiple of its steps per
    call), through its loop (`fit_loop` with a step budget, or Keras ``fit``
    with ``steps_per_epoch`` over the repeated data); the time from the
    epoch's begin to its end, divided by the steps run, is the round's
    figure. The data is not shuffled between variants: give each the same.

    Args:
      make_state: returns a fresh `TrainState`, or a dict / tuple / list of
        them for a user-written step, on every call.
      loss_or_fn: a tfpure `Step` (its loss or body, guard and
        grad_transform kept; the variants set steps per call, XLA and
        eagerness): the explicit way, e.g. ``tp.make_step(body)``. Or a loss
        (as `make_train_step` takes it), or a step body ``fn(states, batch)
        -> (states, logs)``, told apart by this rule: a callable is a body
        when `make_state` returns several states or its first parameter is
        named ``state``/``states``, else a loss (a body read as a loss fails
        with a message saying to pass ``tp.make_step(fn)``).
      data: a `tf.data.Dataset` of batches (repeated as needed).
      variants: names from `VARIANTS`, or a dict of name -> `Variant`.
      steps_per_call: the fused variants' steps per call.
      rounds: measured rounds.
      warmup: discarded rounds before them (at least 1: the first traces).
      steps: steps per round; default: the data's batches (rounded down to
        a multiple of `steps_per_call`), or ``4 * steps_per_call``.
      title: names the workload in tables and charts.

    Returns:
      A `BenchResult`.

    Raises:
      ValueError: an unknown variant name, a count below its minimum, no
        variant that can run what was given (the reasons named).
      TypeError: `data` is not a `tf.data.Dataset`; a `Variant` or
        `loss_or_fn` of the wrong kind.

    Example:
      >>> import keras, numpy as np, tensorflow as tf, tfpure as tp
      >>> def make_state():
      ...     keras.utils.set_random_seed(0)
      ...     model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
      ...     return tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD(0.01))
      >>> x = np.random.default_rng(0).normal(size=(256, 8)).astype("float32")
      >>> data = tf.data.Dataset.from_tensor_slices((x, x[:, :1])).batch(32)
      >>> result = tp.bench.compare(make_state, "mse", data, variants=("graph", "fused"),
      ...                           steps_per_call=4, rounds=2)
      >>> result.steps, len(result.rounds["fused"])
      ({'graph': 8, 'fused': 8}, 2)
      >>> result.paired("fused", "fused")  # each round against itself
      1.0
    """
    if not callable(make_state):
        raise TypeError(f"`make_state` must be a function making new states; got {make_state!r}.")
    if not isinstance(data, tf.data.Dataset):
        raise TypeError(f"`data` must be a tf.data.Dataset of batches; got {type(data).__name__}.")
    chosen = _variants(variants)
    k = check_count("steps_per_call", steps_per_call)
    rounds = check_count("rounds", rounds)
    warmup = check_count("warmup", warmup)
    steps = _default_steps(data, k) if steps is None else check_count("steps", steps)

    runners, counts, skipped, autos = _runners(chosen, make_state, loss_or_fn, data, k, steps)
    if not runners:
        raise ValueError(
            "No variant could run: "
            + "; ".join(f"{name}: {why}" for name, why in skipped.items())
            + "."
        )
    times, outside = _rounds(runners, counts, warmup, rounds)
    return BenchResult(
        rounds={name: tuple(t) for name, t in times.items()},
        steps=counts,
        outside={name: tuple(o) for name, o in outside.items() if o},
        skipped=skipped,
        steps_per_call=k,
        warmup=warmup,
        machine=machine(),
        title=title,
        families={name: _family(chosen[name]) for name in runners},
        chosen={n: (a.spec.jit_compile, a.spec.steps_per_call) for n, a in autos.items()},
    )


def _runners(
    chosen: Mapping[str, Variant],
    make_state: Callable[[], Any],
    loss_or_fn: Any,
    data: tf.data.Dataset,
    k: int,
    steps: int,
) -> tuple[
    dict[str, Callable[[int], float | None]], dict[str, int], dict[str, str], dict[str, AutoStep]
]:
    """Each chosen variant's runner on fresh states, its steps a round, the variants
    that cannot run (and why), and the ``"auto"`` variants' steps (chosen as they run)."""
    runners: dict[str, Callable[[int], float | None]] = {}
    counts: dict[str, int] = {}
    skipped: dict[str, str] = {}
    autos: dict[str, AutoStep] = {}
    for name, variant in chosen.items():
        scope = variant.strategy.scope() if variant.strategy else contextlib.nullcontext()
        with scope:
            states = make_state()
        if not leaves(states):
            raise TypeError(f"`make_state()` must return TrainState(s); got {states!r}.")
        if variant.custom is not None:
            runners[name] = _timed_around(variant.custom(states, data))
        else:
            step = _as_step(loss_or_fn, states)
            if variant.keras:
                blocker = _keras_blocker(step, states)
                if blocker is not None:
                    skipped[name] = blocker
                    continue
                runners[name] = _keras_runner(step, variant, k, states, data)
            else:
                mine = _tfpure_step(step, variant, k)
                if isinstance(mine, AutoStep):
                    autos[name] = mine
                runners[name] = _tfpure_runner(mine, variant, states, data)
        counts[name] = _steps_for(variant, steps, k)
    return runners, counts, skipped, autos


def _rounds(
    runners: Mapping[str, Callable[[int], float | None]],
    counts: Mapping[str, int],
    warmup: int,
    rounds: int,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Runs every variant once a round, side by side: (seconds per step of each measured
    round, seconds of each round outside the steps)."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    outside: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(warmup + rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            inside = run(counts[name])
            total = time.perf_counter() - start
            if r < warmup:
                continue
            times[name].append((total if inside is None else inside) / counts[name])
            if inside is not None:
                outside[name].append(total - inside)
    return times, outside


# -- command line ----------------------------------------------------------------------


def _load(ref: str) -> Any:
    """``module:name`` or ``path/to/file.py:name`` -> the object."""
    module, sep, attr = ref.rpartition(":")
    if not sep or not module or not attr:
        raise SystemExit(
            f"expected module:name or file.py:name (e.g. mymodel:make_state); got {ref!r}"
        )
    if module.endswith(".py"):
        path = Path(module).resolve()
        if not path.is_file():
            raise SystemExit(f"no such file: {module}")
        name = f"_tfpure_bench_{path.stem}_{abs(hash(str(path)))}"
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, path)
            loaded = importlib.util.module_from_spec(spec)
            sys.modules[name] = loaded
            spec.loader.exec_module(loaded)
        obj: Any = sys.modules[name]
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def main(argv: Sequence[str] | None = None) -> BenchResult:
    """``python -m tfpure.bench``: `compare` from the command line; prints the table.

    Example:
      >>> import tfpure as tp
      >>> tp.bench.main(["--help"])  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      SystemExit: 0
    """
    parser = argparse.ArgumentParser(
        prog="python -m tfpure.bench",
        description="Measure seconds per training step of your own model: eager vs graph vs "
        "fused vs XLA vs Keras fit, interleaved round by round in one process.",
    )
    parser.add_argument(
        "make_state", help="module:function (or file.py:function) returning a fresh TrainState"
    )
    parser.add_argument(
        "make_data", help="module:function (or file.py:function) returning a tf.data.Dataset"
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--loss", help="a Keras loss name (e.g. mse), or module:object")
    what.add_argument("--body", help="module:function, a step body fn(states, batch) (make_step)")
    parser.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated, from {', '.join(VARIANTS)} (default: %(default)s)",
    )
    parser.add_argument("--steps-per-call", type=int, default=16, help="fused variants' k")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="discarded rounds (default 1)")
    parser.add_argument("--steps", type=int, help="steps per round (default: one epoch)")
    parser.add_argument(
        "--chart",
        default="tfpure_bench.png",
        help="the chart's path (PNG, needs matplotlib; '' for none; default: %(default)s)",
    )
    args = parser.parse_args(argv)

    make_state, make_data = _load(args.make_state), _load(args.make_data)
    data = make_data() if callable(make_data) else make_data
    if args.body is not None:
        loss_or_fn: Any = make_step(_load(args.body))
    elif ":" in args.loss:
        loss_or_fn = _load(args.loss)
    else:
        loss_or_fn = args.loss
    result = compare(
        make_state,
        loss_or_fn,
        data,
        variants=[v.strip() for v in args.variants.split(",") if v.strip()],
        steps_per_call=args.steps_per_call,
        rounds=args.rounds,
        warmup=args.warmup,
        steps=args.steps,
        title=args.make_state,
    )
    print(result.to_markdown(), end="")
    if args.chart:
        try:
            result.plot(args.chart)
            print(f"chart: {args.chart}")
        except ImportError as e:
            print(f"no chart: {e}")
    return result


if __name__ == "__main__":
    main()
