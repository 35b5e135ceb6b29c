"""The guard at one step a call: judged per window of calls, per step, or not at all.

    python benchmarks/guard_window.py mlp [--rounds 9]
    python benchmarks/guard_window.py mobilenet [--rounds 5]   # or transformer
    python benchmarks/guard_window.py defaults [--on mlp|mobilenet|transformer] [--rounds 7]
                                               [--arrays]
    python benchmarks/guard_window.py first [--on mlp|mobilenet|transformer] [--rounds 5]
    python benchmarks/guard_window.py fused [--xla] [--rounds 30]

``mlp``: the tutorial MLP of `benchmarks/run.py` (64 batches of 64), driven through
`Step.runner` (512 steps a round in calls of `Step.span` steps, rounds interleaved in one
process): a guarded runner whose calls span a window (``span=True``, as
`fit_loop` runs when no callback looks at single steps; ``lasting=True``:
the data repeats, as `fit_loop` knows data of known length lasts), a guarded runner
judging every step (``span=False``, as with a batch hook), and an unguarded
one. Prints the median per-step time of each and the paired medians of
guarded / unguarded. ``mobilenet`` / ``transformer``: `tp.bench.compare` on
`benchmarks/run.py`'s real-model states and data, tfpure k=1 guarded and
unguarded (both through `fit_loop`, so in windows) and Keras `fit` spe=1:
the guard's cost and tfpure / Keras. ``defaults``: the tutorial MLP (256
batches of 64 an epoch; ``--on mobilenet`` / ``transformer``: a real model
and its data) through `fit_loop` and Keras `fit` as a new user calls them,
with the progress bar (``verbose=1``, both functions' default) and without,
one epoch a round, rounds interleaved; per-step times and paired ratios to
Keras `fit` ``verbose=1``; ``--arrays``: both are given the same examples as
arrays with ``batch_size=`` (each shuffles them each epoch, its default).
``first``: a run's start, where the guard costs its traces: each round
builds a fresh state and step for each configuration and times one whole
`fit_loop` call of one epoch of 8 batches (tracing, graph optimisation, the
steps), guarded ("raise") and unguarded, at one step a call (in windows), one
step a call with a batch hook (each step judged alone) and 16 a call; and
Keras `fit` of the same epoch on a freshly compiled model. Prints the
median seconds of each and paired medians of guarded / unguarded and of
each to Keras `fit`.
``fused``: the guard at 16 steps a call, as `benchmarks/run.py` times it: the
tutorial MLP (320 batches of 64, the pipeline of `run.py`), one `fit_loop` of
320 steps a round, guarded ("raise") and unguarded, timed from the epoch's
begin to its end, rounds interleaved (``--xla``: ``jit_compile=True``, the
calls over groups of batches). Prints the median per-step time of each and
the paired median of guarded / unguarded.
One process measures one checkout: run it under each checkout's ``PYTHONPATH`` to compare code.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path


def _run_module():  # benchmarks/run.py: its workloads
    sys.path.insert(0, str(Path(__file__).parent))
    import run

    return run


def measure_mlp(rounds: int) -> None:
    import keras

    import tfpure as tp

    run = _run_module()
    state = run.mlp_state(run.tutorial_mlp)
    data = run.make_dataset(64, 64, 64).repeat()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    runners, most = {}, 0
    for name, nonfinite, span in [("window", "raise", True), ("per step", "raise", False),
                                  ("no guard", None, True)]:  # fmt: skip
        s, step = state(), tp.make_train_step(loss, nonfinite=nonfinite)
        runners[name] = step.runner(s, iter(data), span=span, lasting=True)  # (data repeats)
        most = step.span(s)  # (every runner's calls: `tfpure.graph.WINDOW` steps)
        for _ in range(20):  # warm-up: traces, graph optimisation
            runners[name](most)
    calls = {
        name: functools.partial(_calls, run, 512 // most, most) for name, run in runners.items()
    }
    _report(_interleaved(calls, rounds, 512), "no guard")


def _calls(run, calls: int, steps: int) -> None:
    for _ in range(calls):
        run(steps)


def _interleaved(runs: dict, rounds: int, steps: int) -> dict[str, list[float]]:
    """Microseconds a step of each of `runs` (each runs `steps` steps), rounds interleaved."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, go in runs.items():
            begin = time.perf_counter()
            go()
            times[name].append((time.perf_counter() - begin) / steps * 1e6)
    return times


def _report(times: dict[str, list[float]], base: str) -> None:
    """Each row's median and its paired median ratio to the row `base`."""
    for name, per_step in times.items():
        ratio = _paired(per_step, times[base])
        print(f"{name}: {statistics.median(per_step):.0f} us a step, / {base} {ratio:.3f}")


def measure_real_model(name: str, rounds: int) -> None:
    from tfpure.bench import VARIANTS, Variant, compare

    run = _run_module()

    spec = run.REAL_MODELS[name]
    result = compare(
        run.mlp_state(spec["build"]),
        run.SCCE,
        run.real_model_data(name, spec["batch"], spec["steps"]),
        variants={
            "k=1": VARIANTS["graph"],
            "k=1 no guard": Variant(steps_per_call=1, nonfinite=None),
            "keras fit": VARIANTS["keras_fit"],
        },
        rounds=rounds,
        steps=spec["steps"],
        title=spec["title"],
    )
    print(f"{spec['short']}: guard (k=1 / no guard) {result.paired('k=1', 'k=1 no guard'):.3f}, "
          f"k=1 / keras fit {result.paired('k=1', 'keras fit'):.3f}, "
          f"no guard / keras fit {result.paired('k=1 no guard', 'keras fit'):.3f}")  # fmt: skip


def measure_defaults(model: str, rounds: int, arrays: bool) -> None:
    import contextlib
    import io

    import tensorflow as tf

    import tfpure as tp

    run = _run_module()
    steps = 256 if model == "mlp" else run.REAL_MODELS[model]["steps"]
    data, state = _workload(run, model, steps)
    given: object = data  # fit_loop's `data`; Keras `fit` takes it as ``fit(*xy)``
    xy: tuple = (data,)
    fed: dict = {}
    if arrays:  # the same examples as arrays, batched and shuffled by each function
        batches = list(data)
        given = xy = tuple(tf.concat([b[i] for b in batches], 0).numpy() for i in (0, 1))
        fed = {"batch_size": int(batches[0][0].shape[0])}

    def tfpure_fit(verbose: int):
        s, step = state(), tp.make_train_step(run.SCCE)
        return lambda: tp.fit_loop(s, given, step, epochs=1, verbose=verbose, **fed)

    def keras_fit(verbose: int):
        model = _compiled(run, state)
        return lambda: model.fit(*xy, epochs=1, verbose=verbose, **fed)

    runs = {"fit_loop verbose=1": tfpure_fit(1), "fit_loop verbose=0": tfpure_fit(0),
            "keras fit verbose=1": keras_fit(1), "keras fit verbose=0": keras_fit(0)}  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):  # the bars are drawn, not shown
        for go in runs.values():  # warm-up: traces, graph optimisation
            go()
        times = _interleaved(runs, rounds, steps)
    _report(times, "keras fit verbose=1")


def _workload(run, model: str, steps: int):
    """(`steps` batches of the model's data, a maker of fresh states): the tutorial MLP or
    one of `benchmarks/run.py`'s real models."""
    if model == "mlp":
        return run.make_dataset(64, 64, steps), run.mlp_state(run.tutorial_mlp)
    spec = run.REAL_MODELS[model]
    return run.real_model_data(model, spec["batch"], steps), run.mlp_state(spec["build"])


def _compiled(run, state):
    """A fresh state's model compiled as `tp.bench` compiles a Keras row: the state's
    optimizer and metrics."""
    s = state()
    metrics = [m for name, m in s.metrics.items() if name != "loss"]
    s.model.compile(s.optimizer, run.SCCE, metrics=metrics)
    return s.model


def _batch_hook():
    """A Keras callback with a batch hook: `fit_loop` then judges each step alone."""
    import keras

    class BatchHook(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            del batch, logs

    return BatchHook()


def measure_first(model: str, rounds: int) -> None:
    import contextlib
    import io

    import tfpure as tp

    run = _run_module()
    data, state = _workload(run, model, 8)

    def first(k: int, nonfinite, hook: bool = False):
        def go():
            step = tp.make_train_step(run.SCCE, steps_per_call=k, nonfinite=nonfinite)
            callbacks = [_batch_hook()] if hook else []
            tp.fit_loop(state(), data, step, epochs=1, verbose=0, callbacks=callbacks)

        return go

    def keras_fit():
        _compiled(run, state).fit(data, epochs=1, verbose=0)

    runs = {}
    for name, k, hook in [("k=1", 1, False), ("k=1 batch hook", 1, True), ("k=16", 16, False)]:
        runs[name] = first(k, "raise", hook)
        runs[f"{name} no guard"] = first(k, None, hook)
    runs["keras fit"] = keras_fit
    with contextlib.redirect_stdout(io.StringIO()):
        keras_fit()  # warm-up: the process's first graph functions
        times = _interleaved(runs, rounds, 1)
    for name, seconds in times.items():
        unguarded = times.get(f"{name} no guard")
        guard = f", / no guard {_paired(seconds, unguarded):.3f}" if unguarded else ""
        print(f"{name}: {statistics.median(seconds) / 1e6:.3f} s{guard}"
              f", / keras fit {_paired(seconds, times['keras fit']):.3f}")  # fmt: skip


def _paired(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def measure_fused(rounds: int, xla: bool) -> None:
    import tfpure as tp

    run = _run_module()
    data = run.make_dataset(64, 64, 320)
    runs = {}
    for name, nonfinite in [("guarded", "raise"), ("no guard", None)]:
        state = run.mlp_state(run.tutorial_mlp)()
        step = tp.make_train_step(run.SCCE, nonfinite=nonfinite, steps_per_call=16, jit_compile=xla)
        timer = run._WindowTimer()

        def go(state=state, step=step, timer=timer) -> float:
            tp.fit_loop(state, data, step, steps=320, callbacks=[timer], verbose=0)
            return timer.end - timer.begin

        for _ in range(3):  # warm-up: traces, graph optimisation
            go()
        runs[name] = go
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, go in runs.items():
            times[name].append(go() / 320 * 1e6)
    _report(times, "no guard")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "model", choices=["mlp", "mobilenet", "transformer", "defaults", "first", "fused"]
    )
    parser.add_argument("--on", choices=["mlp", "mobilenet", "transformer"], default="mlp",
                        help="defaults, first: the model")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--arrays", action="store_true",
                        help="defaults: both given arrays, batch_size=")  # fmt: skip
    parser.add_argument("--xla", action="store_true", help="fused: jit_compile=True")
    args = parser.parse_args()
    if args.model == "fused":
        measure_fused(args.rounds or 30, args.xla)
    elif args.model == "mlp":
        measure_mlp(args.rounds or 9)
    elif args.model == "first":
        measure_first(args.on, args.rounds or 5)
    elif args.model == "defaults":
        measure_defaults(args.on, args.rounds or 7, args.arrays)
    else:
        measure_real_model(args.model, args.rounds or 5)


if __name__ == "__main__":
    main()
