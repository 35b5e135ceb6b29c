"""tfpure benchmark: per-step time of training loops, measured side by side.

Run ``python benchmarks/run.py`` (``--quick`` for a short smoke run). In one
process, variants interleaved round by round (so a busy machine slows all of
them alike), it measures the median per-step time of

* the tutorial's hand-written loop, eagerly and as a ``tf.function``, and as
  an in-graph ``tf.range`` loop of 16 steps per call (the overhead floor);
* Keras ``fit`` with ``steps_per_execution`` 1 and 16;
* tfpure ``fit_loop`` with 1 and 16 steps per call, with XLA, and without the
  non-finite guard;

for (a) the tutorial-sized MLP (64-128-10, batch 64, Dropout, L2), which is
bound by per-step overhead, and (b) a compute-bound MLP (3 x 1024, batch 512),
whose GFLOP/s are compared with those of a bare ``tf.matmul`` loop measured
in the same rounds. It also counts traces over a multi-epoch run with a
ragged last batch and the RSS growth over 20,000 steps. Results go to
``benchmarks/results/`` as JSON, a Markdown table and a PNG chart.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

import tfpure as tp

HERE = Path(__file__).resolve().parent
SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


# -- workloads --------------------------------------------------------------------


def tutorial_mlp(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(128, "relu", kernel_regularizer=keras.regularizers.L2(1e-4)),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(10),
        ]
    )


def compute_mlp(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((1024,))]
        + [keras.layers.Dense(1024, "relu") for _ in range(3)]
        + [keras.layers.Dense(10)]
    )


WORKLOADS = {
    "tutorial_mlp": {"build": tutorial_mlp, "features": 64, "batch": 64, "steps": 320},
    "compute_mlp": {"build": compute_mlp, "features": 1024, "batch": 512, "steps": 16},
}


def make_dataset(features: int, batch: int, steps: int, extra: int = 0) -> tf.data.Dataset:
    rng = np.random.default_rng(0)
    n = batch * steps + extra
    x = rng.normal(size=(n, features)).astype("float32")
    y = rng.integers(0, 10, size=n).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).prefetch(tf.data.AUTOTUNE)


def matmul_flops_per_step(model: keras.Model, batch: int) -> float:
    """Matmul FLOPs of one training step: forward, weight gradients, input gradients."""
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    sizes = [layer.kernel.shape[0] * layer.kernel.shape[1] for layer in dense]
    return 2.0 * batch * (2 * sum(sizes) + sum(sizes[1:]))


MATMUL = "bare tf.matmul loop"
MATMUL_FLOPS = 2.0 * 512 * 1024 * 1024  # one (512 x 1024) @ (1024 x 1024) product


def bare_matmul(steps: int) -> Callable:
    """The machine's reference: ``steps`` bare matmuls of the compute MLP's size, one graph.

    Measured as one more variant of the compute rounds, so it sees the same
    machine as the training loops it is compared with.
    """
    a = tf.random.normal((512, 1024))
    b = tf.Variable(tf.random.normal((1024, 1024)))

    @tf.function
    def loop() -> tf.Tensor:
        acc = tf.zeros((512, 1024))
        for _ in tf.range(steps):
            acc += tf.matmul(a, b)
        return acc

    return lambda: loop().numpy()


# -- variants: each returns a function that runs one epoch and blocks -------------


def tutorial_loop(model: keras.Model, data: tf.data.Dataset, compiled: bool) -> Callable:
    """The tutorial's loop, as written there."""
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    train_loss = keras.metrics.Mean(name="train_loss")
    train_acc = keras.metrics.SparseCategoricalAccuracy(name="train_accuracy")

    def train_step(x_batch, y_batch):
        with tf.GradientTape() as tape:
            predictions = model(x_batch, training=True)
            loss = SCCE(y_batch, predictions)
            loss += sum(model.losses)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        train_loss.update_state(loss)
        train_acc.update_state(y_batch, predictions)

    if compiled:
        train_step = tf.function(train_step)

    def epoch() -> None:
        train_loss.reset_state()
        train_acc.reset_state()
        for x_batch, y_batch in data:
            train_step(x_batch, y_batch)
        float(train_loss.result())

    return epoch


def tutorial_range_loop(model: keras.Model, data: tf.data.Dataset, k: int) -> Callable:
    """The tutorial's step, k at a time in an in-graph tf.range loop: the overhead floor."""
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    train_loss = keras.metrics.Mean()
    train_acc = keras.metrics.SparseCategoricalAccuracy()

    @tf.function
    def train_k(iterator):
        for _ in tf.range(k):
            x_batch, y_batch = next(iterator)
            with tf.GradientTape() as tape:
                predictions = model(x_batch, training=True)
                loss = SCCE(y_batch, predictions) + sum(model.losses)
            gradients = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
            train_loss.update_state(loss)
            train_acc.update_state(y_batch, predictions)

    calls = int(data.cardinality()) // k

    def epoch() -> None:
        train_loss.reset_state()
        train_acc.reset_state()
        iterator = iter(data)
        for _ in range(calls):
            train_k(iterator)
        float(train_loss.result())

    return epoch


def keras_fit(model: keras.Model, data: tf.data.Dataset, k: int, jit: bool = False) -> Callable:
    """Keras' own loop on the same model, loss, optimizer and data."""
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=SCCE,
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        steps_per_execution=k,
        jit_compile=jit,
    )

    def epoch() -> None:
        model.fit(data, epochs=1, verbose=0, shuffle=False)

    return epoch


def tfpure_fit(model: keras.Model, data: tf.data.Dataset, **options) -> Callable:
    state = tp.TrainState.create(
        model=model,
        optimizer=keras.optimizers.Adam(1e-3),
        metrics={"accuracy": keras.metrics.SparseCategoricalAccuracy()},
    )
    step = tp.make_train_step(SCCE, **options)

    def epoch() -> None:
        tp.fit_loop(state, data, step, epochs=1, verbose=0)

    return epoch


def tfpure_mirrored(model: keras.Model, data: tf.data.Dataset) -> Callable:
    """tfpure's distributed path (strategy.run, per-replica loss scaling) on one replica."""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        copy = keras.models.clone_model(model)
        for source, target in zip(model.variables, copy.variables, strict=True):
            target.assign(source.value)
        return tfpure_fit(copy, data)


VARIANTS: dict[str, Callable[[keras.Model, tf.data.Dataset], Callable]] = {
    "tutorial eager": lambda m, d: tutorial_loop(m, d, compiled=False),
    "tutorial tf.function": lambda m, d: tutorial_loop(m, d, compiled=True),
    "tutorial tf.range x16": lambda m, d: tutorial_range_loop(m, d, 16),
    "keras fit spe=1": lambda m, d: keras_fit(m, d, 1),
    "keras fit spe=16": lambda m, d: keras_fit(m, d, 16),
    "tfpure k=1": lambda m, d: tfpure_fit(m, d),
    "tfpure k=16": lambda m, d: tfpure_fit(m, d, steps_per_call=16),
    "tfpure XLA k=1": lambda m, d: tfpure_fit(m, d, jit_compile=True),
    "tfpure k=1 no guard": lambda m, d: tfpure_fit(m, d, nonfinite=None),
    "tfpure k=16 no guard": lambda m, d: tfpure_fit(m, d, steps_per_call=16, nonfinite=None),
    "keras fit XLA": lambda m, d: keras_fit(m, d, 1, jit=True),
    "tfpure k=1 Mirrored, 1 replica": tfpure_mirrored,
}
# Variants slow enough that a tenth of the epoch measures them well.
SLOW = {"tutorial eager", "tfpure XLA k=1", "keras fit XLA"}


def measure(
    workload: str, rounds: int, skip: set[str], reference: tuple[str, Callable, int] | None = None
) -> dict[str, dict[str, float]]:
    """Seconds per step of every variant, interleaved round by round.

    Returns the median and the minimum over rounds for each variant. (On a
    shared virtual machine, delays only ever add time: the minimum shows
    what a variant costs when nothing interferes, the median what it costs
    typically.) ``reference`` is an extra ``(name, epoch, steps)`` measured
    in the same rounds.
    """
    spec = WORKLOADS[workload]
    data = make_dataset(spec["features"], spec["batch"], spec["steps"])
    short = data.take(max(16, spec["steps"] // 10))
    epochs, steps = {}, {}
    for name, make in VARIANTS.items():
        if name in skip:
            continue
        slow = name in SLOW and workload == "tutorial_mlp"
        epochs[name] = make(spec["build"](), short if slow else data)
        steps[name] = int((short if slow else data).cardinality())
        epochs[name]()  # warm up: trace, build, fill caches
    if reference is not None:
        name, epoch, n = reference
        epochs[name], steps[name] = epoch, n
        epoch()
    times: dict[str, list[float]] = {name: [] for name in epochs}
    for _ in range(rounds):
        for name, epoch in epochs.items():
            start = time.perf_counter()
            epoch()
            times[name].append((time.perf_counter() - start) / steps[name])
    return {
        name: {"median": statistics.median(values), "min": min(values), "rounds": values}
        for name, values in times.items()
    }


# -- a user-written two-state step: a GAN --------------------------------------------

# Noise of the data's width: the two-call composition checks it against the generator.
GAN_BATCH, GAN_STEPS, GAN_NOISE = 64, 64, 8
GAN_BCE = keras.losses.BinaryCrossentropy(from_logits=True)


def gan_states(seed: int = 0) -> dict[str, tp.TrainState]:
    keras.utils.set_random_seed(seed)
    g = keras.Sequential(
        [keras.Input((GAN_NOISE,)), keras.layers.Dense(64, "relu"), keras.layers.Dense(8)]
    )
    d = keras.Sequential([keras.Input((8,)), keras.layers.Dense(64, "relu"), keras.layers.Dense(1)])
    return {
        "g": tp.TrainState.create(model=g, optimizer=keras.optimizers.Adam(1e-3), seed=seed),
        "d": tp.TrainState.create(model=d, optimizer=keras.optimizers.Adam(1e-3), seed=seed + 1),
    }


def gan_data() -> tf.data.Dataset:
    real = np.random.default_rng(0).normal(size=(GAN_BATCH * GAN_STEPS, 8)).astype("float32")
    return tf.data.Dataset.from_tensor_slices(real).batch(GAN_BATCH).prefetch(tf.data.AUTOTUNE)


def gan_body(states, real):
    """The discriminator's update, then the generator's: one user-written step."""
    g, d = states["g"], states["d"]
    z = keras.random.normal((tf.shape(real)[0], GAN_NOISE), seed=g.rng)
    with tf.GradientTape() as tape:
        real_logits = d.model(real, training=True)
        fake_logits = d.model(g.model(z, training=False), training=True)
        d_loss = GAN_BCE(tf.ones_like(real_logits), real_logits) + GAN_BCE(
            tf.zeros_like(fake_logits), fake_logits
        )
    d = d.apply_gradients(tape.gradient(d_loss, d.model.trainable_variables))
    with tf.GradientTape() as tape:
        logits = d.model(g.model(z, training=True), training=False)
        g_loss = GAN_BCE(tf.ones_like(logits), logits)
    g = g.apply_gradients(tape.gradient(g_loss, g.model.trainable_variables))
    return {"g": g, "d": d}, {"d_loss": d_loss, "g_loss": g_loss}


def gan_fused(k: int) -> Callable:
    states, data = gan_states(), gan_data()
    step = tp.make_step(gan_body, steps_per_call=k)

    def epoch() -> None:
        tp.fit_loop(states, data, step, epochs=1, verbose=0)

    return epoch


def gan_composed() -> Callable:
    """The composition tfpure offered before make_step: two compiled full-control steps,
    called one after the other from a Python step function (two graph calls per batch)."""
    states, data = gan_states(), gan_data()
    g, d = states["g"], states["d"]

    def noise(real: tf.Tensor) -> tf.Tensor:
        return keras.random.normal((tf.shape(real)[0], GAN_NOISE), seed=g.rng)

    def d_loss(model, real, training):
        real_logits = model(real, training=training)
        fake_logits = model(g.model(noise(real), training=False), training=training)
        loss = GAN_BCE(tf.ones_like(real_logits), real_logits) + GAN_BCE(
            tf.zeros_like(fake_logits), fake_logits
        )
        return loss, None

    def g_loss(model, real, training):
        logits = d.model(model(noise(real), training=training), training=False)
        return GAN_BCE(tf.ones_like(logits), logits), None

    d_step, g_step = tp.make_train_step(d_loss), tp.make_train_step(g_loss)

    def step(states, real):
        g, d = states
        d, d_logs = d_step(d, real)
        g, g_logs = g_step(g, real)
        return (g, d), {"d_loss": d_logs["loss"], "g_loss": g_logs["loss"]}

    def epoch() -> None:
        g.reset_metrics()
        d.reset_metrics()
        tp.fold(step, (g, d), data)

    return epoch


GAN_VARIANTS: dict[str, Callable[[], Callable]] = {
    "GAN two-call composition": gan_composed,
    "GAN make_step k=1": lambda: gan_fused(1),
    "GAN make_step k=16": lambda: gan_fused(16),
}


def measure_gan(rounds: int) -> dict[str, dict[str, float]]:
    """Seconds per GAN step (one batch, both updates) of each variant, interleaved."""
    epochs = {name: make() for name, make in GAN_VARIANTS.items()}
    for epoch in epochs.values():
        epoch()  # warm up
    times: dict[str, list[float]] = {name: [] for name in epochs}
    for _ in range(rounds):
        for name, epoch in epochs.items():
            start = time.perf_counter()
            epoch()
            times[name].append((time.perf_counter() - start) / GAN_STEPS)
    return {
        name: {"median": statistics.median(values), "min": min(values), "rounds": values}
        for name, values in times.items()
    }


# -- traces and memory --------------------------------------------------------------


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def traces_and_memory(total_steps: int) -> dict[str, float]:
    data = make_dataset(64, 64, 100, extra=17)  # 101 batches, the last one of 17
    val = make_dataset(64, 64, 10, extra=5)
    state = tp.TrainState.create(
        model=tutorial_mlp(),
        optimizer=keras.optimizers.Adam(1e-3),
        metrics={"accuracy": keras.metrics.SparseCategoricalAccuracy()},
    )
    train_step, eval_step = tp.make_train_step(SCCE), tp.make_eval_step(SCCE)
    tp.fit_loop(state, data, train_step, epochs=5, eval_step=eval_step, val_data=val, verbose=0)
    traces = {
        "train_step_traces_5_epochs": train_step.experimental_get_tracing_count(),
        "eval_step_traces_5_epochs": eval_step.experimental_get_tracing_count(),
    }
    epochs = max(1, total_steps // 101)
    tp.fit_loop(state, data, train_step, epochs=20, verbose=0)  # warm-up: allocator, caches
    before = rss_mb()
    tp.fit_loop(state, data, train_step, epochs=epochs, verbose=0)
    after = rss_mb()
    return {
        **traces,
        "rss_steps": epochs * 101,
        "rss_before_mb": before,
        "rss_after_mb": after,
        "rss_growth_mb": after - before,
        "train_step_traces_total": train_step.experimental_get_tracing_count(),
    }


def gflops(variants: dict[str, dict], matmul: dict) -> dict:
    """The compute MLP's GFLOP/s, beside the bare matmul's measured in the same rounds.

    From median and from minimum step times, and ``paired_fraction``: the
    median over rounds of a variant's GFLOP/s over the matmul's in that round.
    """
    flops = matmul_flops_per_step(compute_mlp(), WORKLOADS["compute_mlp"]["batch"])
    out: dict = {
        stat: {
            "matmul": MATMUL_FLOPS / matmul[stat] / 1e9,
            "variants": {name: flops / t[stat] / 1e9 for name, t in variants.items()},
        }
        for stat in ("median", "min")
    }
    out["paired_fraction"] = {
        name: statistics.median(
            flops * m / (MATMUL_FLOPS * v)
            for m, v in zip(matmul["rounds"], t["rounds"], strict=True)
        )
        for name, t in variants.items()
    }
    return out


# -- report -----------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "platform": platform.platform(),
    }


# Each ratio: (name, workload, numerator, denominator, goal).
RATIOS = [
    ("tfpure k=1 / keras fit spe=1", "tutorial_mlp", "tfpure k=1", "keras fit spe=1", 0.8),
    (
        "tfpure k=1 / tutorial tf.function",
        "tutorial_mlp",
        "tfpure k=1",
        "tutorial tf.function",
        1.10,
    ),
    ("tfpure k=16 / keras fit spe=16", "tutorial_mlp", "tfpure k=16", "keras fit spe=16", 0.95),
    (
        "tfpure k=16 / tutorial tf.range x16",
        "tutorial_mlp",
        "tfpure k=16",
        "tutorial tf.range x16",
        1.05,
    ),
    ("guard cost, tutorial MLP", "tutorial_mlp", "tfpure k=1", "tfpure k=1 no guard", 1.03),
    ("guard cost, compute MLP", "compute_mlp", "tfpure k=16", "tfpure k=16 no guard", 1.03),
    (
        "distributed path, 1 replica / plain",
        "tutorial_mlp",
        "tfpure k=1 Mirrored, 1 replica",
        "tfpure k=1",
        1.2,
    ),
    (
        "compute MLP: tfpure k=1 / tutorial tf.function",
        "compute_mlp",
        "tfpure k=1",
        "tutorial tf.function",
        None,
    ),
    (
        "GAN: one make_step k=16 / two-call composition",
        "gan",
        "GAN make_step k=16",
        "GAN two-call composition",
        0.5,
    ),
    (
        "GAN: one make_step k=1 / two-call composition",
        "gan",
        "GAN make_step k=1",
        "GAN two-call composition",
        None,
    ),
]


def ratios(results: dict) -> dict[str, dict]:
    """Each ratio three ways; the goal is judged on the paired one.

    ``paired`` is the median over rounds of the ratio within a round (the
    two variants measured seconds apart, so a machine slowdown lasting a few
    seconds cancels); ``of_medians`` and ``of_minimums`` compare the
    variants' medians and best rounds.
    """
    out = {}
    for name, workload, num, den, goal in RATIOS:
        a, b = results[workload][num], results[workload][den]
        paired = statistics.median(x / y for x, y in zip(a["rounds"], b["rounds"], strict=True))
        out[name] = {
            "paired": round(paired, 3),
            "of_medians": round(a["median"] / b["median"], 3),
            "of_minimums": round(a["min"] / b["min"], 3),
            "goal": goal,
            "met": goal is None or paired <= goal,
        }
    return out


def markdown(report: dict) -> str:
    small = report["per_step_seconds"]["tutorial_mlp"]
    big = report["per_step_seconds"]["compute_mlp"]
    lines = [
        "| variant | tutorial MLP ms/step, median (min) | compute MLP ms/step, median (min) |",
        "|---|---:|---:|",
    ]
    for name in small:
        cells = [
            f"{t[name]['median'] * 1e3:.3f} ({t[name]['min'] * 1e3:.3f})" if name in t else "—"
            for t in (small, big)
        ]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    gan = report["per_step_seconds"]["gan"]
    lines += [
        "",
        f"| GAN ({GAN_STEPS} batches of {GAN_BATCH}; both updates) | ms/step, median (min) |",
        "|---|---:|",
        *(f"| {n} | {t['median'] * 1e3:.3f} ({t['min'] * 1e3:.3f}) |" for n, t in gan.items()),
    ]
    lines += [
        "",
        "| ratio (one run) | paired: median of per-round ratios | goal "
        "| ratio of medians | ratio of minimums |",
        "|---|---:|---|---:|---:|",
    ]
    for name, r in report["ratios"].items():
        goal = "" if r["goal"] is None else f"<= {r['goal']}" + ("" if r["met"] else " (missed)")
        lines.append(
            f"| {name} | {r['paired']:.3f} | {goal} | {r['of_medians']:.3f} "
            f"| {r['of_minimums']:.3f} |"
        )
    g = report["gflops"]
    lines += [
        "",
        "| compute MLP | of bare matmul, paired | GFLOP/s, median | of bare matmul "
        "| GFLOP/s, min time | of bare matmul |",
        "|---|---:|---:|---:|---:|---:|",
        f"| {MATMUL} (interleaved) | 100% | {g['median']['matmul']:.1f} | 100% "
        f"| {g['min']['matmul']:.1f} | 100% |",
    ]
    for name in g["median"]["variants"]:
        med, best = g["median"]["variants"][name], g["min"]["variants"][name]
        lines.append(
            f"| {name} | {g['paired_fraction'][name]:.0%} | {med:.1f} "
            f"| {med / g['median']['matmul']:.0%} | {best:.1f} | {best / g['min']['matmul']:.0%} |"
        )
    lines += [
        "",
        "Traces and memory: " + ", ".join(f"{k} = {v:.4g}" for k, v in report["memory"].items()),
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in report["machine"].items()),
    ]
    return "\n".join(lines) + "\n"


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, workload in zip(axes, ("tutorial_mlp", "compute_mlp"), strict=True):
        values = report["per_step_seconds"][workload]
        names = list(values)
        ms = [values[n]["median"] * 1e3 for n in names]
        colors = ["#d62728" if n.startswith("tfpure") else "#7f7f7f" for n in names]
        ax.barh(names, ms, color=colors)
        ax.invert_yaxis()
        if workload == "tutorial_mlp":  # From 50 ms eagerly to under 1 ms fused.
            ax.set_xscale("log")
            ax.set_xlabel("median ms per step (log scale, lower is better)")
        else:
            ax.set_xlabel("median ms per step (lower is better)")
        ax.set_title(workload.replace("_", " "))
        for y, v in enumerate(ms):
            ax.text(v, y, f" {v:.3g}", va="center", fontsize=8)
    machine = report["machine"]
    fig.suptitle(
        f"tfpure benchmark, {machine['cpu']}, {machine['cores']} cores, TF {machine['tensorflow']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rounds",
        type=int,
        default=15,
        help="interleaved rounds of the compute-bound MLP (the tutorial MLP runs twice as many)",
    )
    parser.add_argument("--rss-steps", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="3 rounds, 2,000 RSS steps")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.rss_steps = 3, 2_000
    args.out.mkdir(parents=True, exist_ok=True)

    results = {
        # Overhead-bound rounds are short and their ratios are small differences: twice as many.
        "tutorial_mlp": measure("tutorial_mlp", 2 * args.rounds, skip=set()),
        "compute_mlp": measure(
            "compute_mlp",
            args.rounds,
            skip={"tutorial eager", "tfpure k=1 no guard"},
            reference=(MATMUL, bare_matmul(64), 64),
        ),
    }
    results["gan"] = measure_gan(2 * args.rounds)
    matmul = results["compute_mlp"].pop(MATMUL)
    report = {
        "machine": machine(),
        "per_step_seconds": results,
        "ratios": ratios(results),
        "gflops": gflops(results["compute_mlp"], matmul),
        "memory": traces_and_memory(args.rss_steps),
        "rounds": {
            "tutorial_mlp": 2 * args.rounds,
            "compute_mlp": args.rounds,
            "gan": 2 * args.rounds,
        },
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(report))
    chart(report, args.out / "chart.png")
    print(markdown(report))


if __name__ == "__main__":
    main()
