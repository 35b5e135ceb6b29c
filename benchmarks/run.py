"""tfpure benchmark: per-step time of training loops, measured side by side with `tfpure.bench`.

Run ``python benchmarks/run.py`` (``--quick`` for a short smoke run; results go
to a new folder under ``benchmarks/runs/``; ``--out benchmarks/results``
replaces the committed figures the README quotes). Every workload is one
`tfpure.bench.compare` call: in one process, variants interleaved round by
round (so a busy machine slows all of them alike), each timed from its
loop's epoch begin to its end over a step budget (data set-up and iterator
teardown reported apart). It measures

* the tutorial's hand-written loop, eagerly and as a ``tf.function``, and as
  an in-graph ``tf.range`` loop of 16 steps per call (the overhead floor);
* Keras ``fit`` with ``steps_per_execution`` 1 and 16, and with XLA;
* tfpure ``fit_loop`` with 1 and 16 steps per call, with XLA (and with a
  ``Checkpointer`` attached, its saves left out of the time), without the
  non-finite guard, under a one-replica ``MirroredStrategy``, and with
  ``jit_compile="auto", steps_per_call="auto"`` (against the best of the
  configurations picked by hand);

for (a) the tutorial-sized MLP (64-128-10, batch 64, Dropout, L2), which is
bound by per-step overhead, fed the tutorial's pipeline (JAX + optax, the
speed reference, given the same batches stacked in memory), (b) the same
MLP fed batches stacked in memory beforehand (one tensor slice per batch, no
per-example pipeline), and XLA k=16 fed the same examples as arrays in memory
(``batch_size=64``, in order and shuffled each epoch), against
JAX + optax given the same batches, (c) a compute-bound MLP (3 x 1024, batch
512), whose GFLOP/s are compared with those of a bare ``tf.matmul`` loop
measured in the same rounds, (d) a user-written GAN step (two states)
against the two-call composition, and (e) MobileNetV3Small (32 x 32,
weights=None) and a Transformer block against Keras ``fit``, in graph and
XLA. It also counts traces over a multi-epoch run with a
ragged last batch and the RSS growth over 20,000 steps. Results: JSON, a
Markdown table and PNG charts (with matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from jax_reference import available as jax_available
from jax_reference import jax_scan_loop

import tfpure as tp
from tfpure.arrays import from_arrays
from tfpure.bench import VARIANTS, BenchResult, Variant, compare, machine, plot

HERE = Path(__file__).resolve().parent
SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
Runner = Callable[[int], None]
JAX = "JAX + optax jit(lax.scan) x16"
AUTO = "tfpure auto"  # jit_compile="auto", steps_per_call="auto": chosen in the warm-up round
jax_missing = jax_available()


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


def batches_in_memory(features: int, batch: int, steps: int) -> tf.data.Dataset:
    """`steps` batches stacked beforehand: a batch is one slice (no per-example pipeline)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps, batch, features)).astype("float32")
    y = rng.integers(0, 10, size=(steps, batch)).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y))


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


def bare_matmul(state: object, data: object) -> Runner:
    """The machine's reference: n bare matmuls of the compute MLP's size in one graph call.

    Measured as one more variant of the compute rounds, so it sees the same
    machine as the training loops it is compared with.
    """
    a = tf.random.normal((512, 1024))
    b = tf.Variable(tf.random.normal((1024, 1024)))

    @tf.function
    def loop(n: tf.Tensor) -> tf.Tensor:
        acc = tf.zeros((512, 1024))
        for _ in tf.range(n):
            acc += tf.matmul(a, b)
        return acc

    return lambda n: loop(tf.constant(n)).numpy()


# -- hand-written loops: runner = make(state, data); runner(n) runs n steps and blocks --


def tutorial_loop(compiled: bool) -> Callable[[tp.TrainState, tf.data.Dataset], Runner]:
    """The tutorial's loop, as written there (on the state's model and optimizer)."""

    def make(state: tp.TrainState, data: tf.data.Dataset) -> Runner:
        model, optimizer = state.model, state.optimizer
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
        batches = iter(data.repeat())

        def run(n: int) -> None:
            train_loss.reset_state()
            train_acc.reset_state()
            for _ in range(n):
                train_step(*next(batches))
            float(train_loss.result())

        return run

    return make


def tutorial_range_loop(k: int) -> Callable[[tp.TrainState, tf.data.Dataset], Runner]:
    """The tutorial's step, k at a time in an in-graph tf.range loop: the overhead floor."""

    def make(state: tp.TrainState, data: tf.data.Dataset) -> Runner:
        model, optimizer = state.model, state.optimizer
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

        iterator = iter(data.repeat())

        def run(n: int) -> None:
            train_loss.reset_state()
            train_acc.reset_state()
            for _ in range(n // k):
                train_k(iterator)
            float(train_loss.result())

        return run

    return make


def mlp_variants(slow_xla: bool) -> dict[str, Variant]:
    """The rows of the MLP workloads: `tfpure.bench` variants and the hand-written loops."""
    variants = {
        "tutorial eager": Variant(custom=tutorial_loop(compiled=False), slow=True),
        "tutorial tf.function": Variant(custom=tutorial_loop(compiled=True)),
        "tutorial tf.range x16": Variant(steps_per_call=16, custom=tutorial_range_loop(16)),
        "keras fit spe=1": VARIANTS["keras_fit"],
        "keras fit spe=16": VARIANTS["keras_fit_fused"],
        "tfpure k=1": VARIANTS["graph"],
        "tfpure k=16": VARIANTS["fused"],
        "tfpure XLA k=1": Variant(steps_per_call=1, jit_compile=True),
        "tfpure XLA k=16": Variant(steps_per_call=16, jit_compile=True),
        "tfpure k=1 no guard": Variant(steps_per_call=1, nonfinite=None),
        "tfpure k=16 no guard": Variant(nonfinite=None),
        "tfpure XLA k=16 no guard": Variant(steps_per_call=16, jit_compile=True, nonfinite=None),
        "keras fit XLA": Variant(steps_per_call=1, keras=True, jit_compile=True, slow=slow_xla),
        "tfpure k=1 Mirrored, 1 replica": Variant(
            steps_per_call=1, strategy=tf.distribute.MirroredStrategy(["/cpu:0"])
        ),
    }
    return variants


def mlp_state(build: Callable[[], keras.Model]) -> Callable[[], tp.TrainState]:
    def make() -> tp.TrainState:
        return tp.TrainState.create(
            model=build(),
            optimizer=keras.optimizers.Adam(1e-3),
            metrics={"accuracy": keras.metrics.SparseCategoricalAccuracy()},
        )

    return make


def measure_tutorial(rounds: int) -> BenchResult:
    """The tutorial's pipeline (``from_tensor_slices(...).batch(64)``) feeds every tfpure and
    Keras row; the JAX row stacks the same batches in memory first (as JAX users feed it)."""
    spec = WORKLOADS["tutorial_mlp"]
    variants = mlp_variants(slow_xla=True)
    variants[AUTO] = Variant(steps_per_call="auto", jit_compile="auto")
    variants[CHECKPOINTED] = Variant(steps_per_call=16, custom=checkpointed_xla)
    if jax_missing is None:
        variants[JAX] = Variant(steps_per_call=16, custom=jax_scan_loop(16))
    return compare(
        mlp_state(spec["build"]),
        SCCE,
        make_dataset(spec["features"], spec["batch"], spec["steps"]),
        variants=variants,
        rounds=rounds,
        steps=spec["steps"],
        title="tutorial MLP",
    )


CHECKPOINTED = "tfpure XLA k=16, checkpointed"


class _WindowTimer(keras.callbacks.Callback):
    """The time from a `fit_loop` window's begin to its end (its save comes after)."""

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.begin = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.end = time.perf_counter()


def checkpointed_xla(state: object, data: tf.data.Dataset) -> Callable[[int], float]:
    """A custom runner: XLA k=16 `fit_loop` with a `tp.Checkpointer` attached (a fresh
    directory each round; it saves at the run's end), timed as `tp.bench` times its tfpure
    rows: from the window's begin to its end, so the save is left out."""
    step = tp.make_train_step(SCCE, steps_per_call=16, jit_compile=True)
    timer = _WindowTimer()

    def run(n: int) -> float:
        with tempfile.TemporaryDirectory() as directory:
            tp.fit_loop(state, data, step, steps=n, callbacks=[timer], verbose=0,
                        checkpoint=tp.Checkpointer(directory))  # fmt: skip
        return timer.end - timer.begin

    return run


ARRAYS = "tfpure XLA k=16 on arrays"
SHUFFLED = "tfpure XLA k=16 on arrays, shuffled"


def on_arrays(shuffle: bool | int) -> Callable[[object, tf.data.Dataset], Runner]:
    """A custom runner: XLA k=16 `fit_loop` over the workload's examples as arrays in
    memory (``batch_size=``, in order or shuffled each epoch: `tfpure.arrays`), one epoch
    a round.

    The arrays hold the batches of `data` end to end; their batches are made once
    (`tfpure.arrays.from_arrays`, what ``fit_loop(state, (x, y), batch_size=64)``
    does at its start), then each round runs one epoch of them.
    """

    def make(state: object, data: tf.data.Dataset) -> Runner:
        batches = list(data)
        x = tf.concat([b[0] for b in batches], 0)
        y = tf.concat([b[1] for b in batches], 0)
        epoch = from_arrays((x, y), int(batches[0][0].shape[0]), shuffle=shuffle)
        step = tp.make_train_step(SCCE, steps_per_call=16, jit_compile=True)
        per_epoch = len(batches)

        def run(n: int) -> None:
            if n != per_epoch:
                raise ValueError(f"on_arrays runs whole epochs of {per_epoch} steps; asked {n}.")
            tp.fit_loop(state, epoch, step, epochs=1, verbose=0)

        return run

    return make


def measure_in_memory(rounds: int) -> BenchResult:
    """The fused paths against JAX + optax, all fed the same batches stacked in memory;
    and XLA k=16 fed the same examples as arrays (`on_arrays`)."""
    spec = WORKLOADS["tutorial_mlp"]
    variants = {
        "tfpure k=16": VARIANTS["fused"],
        "tfpure XLA k=16": Variant(steps_per_call=16, jit_compile=True),
        "tfpure XLA k=16 no guard": Variant(steps_per_call=16, jit_compile=True, nonfinite=None),
        ARRAYS: Variant(steps_per_call=16, custom=on_arrays(shuffle=False)),
        SHUFFLED: Variant(steps_per_call=16, custom=on_arrays(shuffle=1)),
    }
    if jax_missing is None:
        variants[JAX] = Variant(steps_per_call=16, custom=jax_scan_loop(16))
    return compare(
        mlp_state(spec["build"]),
        SCCE,
        batches_in_memory(spec["features"], spec["batch"], spec["steps"]),
        variants=variants,
        rounds=rounds,
        steps=spec["steps"],
        title="tutorial MLP, batches in memory",
    )


def measure_compute(rounds: int) -> BenchResult:
    spec = WORKLOADS["compute_mlp"]
    variants = mlp_variants(slow_xla=False)
    del variants["tutorial eager"], variants["tfpure k=1 no guard"]
    return compare(
        mlp_state(spec["build"]),
        SCCE,
        make_dataset(spec["features"], spec["batch"], spec["steps"]),
        variants={**variants, MATMUL: Variant(custom=bare_matmul)},
        rounds=rounds,
        steps=spec["steps"],
        title="compute MLP",
    )


# -- real models: MobileNetV3Small, a Transformer block ----------------------------------


def mobilenet(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3),
        weights=None,
        classes=10,
        include_preprocessing=False,
        classifier_activation=None,
    )


def transformer_block(seed: int = 0) -> keras.Model:
    """Token embedding, one encoder block (4-head attention with dropout, a 256-wide
    feed-forward layer), pooled into 10 classes."""
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((32,), dtype="int32")
    h = keras.layers.Embedding(1000, 64)(tokens)
    h = keras.layers.LayerNormalization()(
        h + keras.layers.MultiHeadAttention(4, 16, dropout=0.1)(h, h)
    )
    ffn = keras.layers.Dense(64)(keras.layers.Dense(256, "relu")(h))
    h = keras.layers.LayerNormalization()(h + keras.layers.Dropout(0.1)(ffn))
    return keras.Model(tokens, keras.layers.Dense(10)(keras.layers.GlobalAveragePooling1D()(h)))


def real_model_data(name: str, batch: int, steps: int) -> tf.data.Dataset:
    rng = np.random.default_rng(0)
    n = batch * steps
    if name == "mobilenet":
        x = rng.uniform(0, 1, (n, 32, 32, 3)).astype("float32")
    else:
        x = rng.integers(0, 1000, (n, 32)).astype("int32")
    y = rng.integers(0, 10, n).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).prefetch(tf.data.AUTOTUNE)


REAL_MODELS = {
    "mobilenet": {
        "build": mobilenet,
        "batch": 32,
        "steps": 16,
        "title": "MobileNetV3Small 32x32",
        "short": "MobileNetV3Small",
    },
    "transformer": {
        "build": transformer_block,
        "batch": 64,
        "steps": 32,
        "title": "Transformer block, 32 tokens",
        "short": "Transformer",
    },
}


def measure_real_model(name: str, rounds: int) -> BenchResult:
    """tfpure (graph, XLA, XLA fused x8) against Keras `fit` (and with XLA) on a real model."""
    spec = REAL_MODELS[name]
    return compare(
        mlp_state(spec["build"]),
        SCCE,
        real_model_data(name, spec["batch"], spec["steps"]),
        variants={
            "tfpure k=1": VARIANTS["graph"],
            "tfpure k=1 no guard": Variant(steps_per_call=1, nonfinite=None),
            "tfpure XLA k=1": Variant(steps_per_call=1, jit_compile=True),
            "tfpure XLA k=8": Variant(steps_per_call=8, jit_compile=True),
            "keras fit spe=1": VARIANTS["keras_fit"],
            "keras fit XLA": Variant(steps_per_call=1, keras=True, jit_compile=True),
            AUTO: Variant(steps_per_call="auto", jit_compile="auto"),
        },
        rounds=rounds,
        steps=spec["steps"],
        title=spec["title"],
    )


def real_model_ratios(model: str) -> list[tuple[str, str, str, str | tuple[str, ...], float]]:
    """The ratios of a real model's rows: XLA against the graph, tfpure against Keras, guard."""
    name = REAL_MODELS[model]["short"]
    return [
        (f"XLA k=1 / graph k=1, {name}", model, "tfpure XLA k=1", "tfpure k=1", 1.0),
        (f"XLA k=8 / graph k=1, {name}", model, "tfpure XLA k=8", "tfpure k=1", 1.0),
        (f"{name}: tfpure k=1 / keras fit spe=1", model, "tfpure k=1", "keras fit spe=1", 1.0),
        (f"{name}: tfpure XLA / keras fit XLA", model, "tfpure XLA k=1", "keras fit XLA", 1.0),
        (f"guard cost, {name}", model, "tfpure k=1", "tfpure k=1 no guard", 1.03),
        (
            f"{name}: tfpure auto / the best of tfpure k=1, XLA k=1, XLA k=8",
            model,
            AUTO,
            ("tfpure k=1", "tfpure XLA k=1", "tfpure XLA k=8"),
            1.05,
        ),
    ]


# -- a user-written two-state step: a GAN --------------------------------------------

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


def gan_composed(states: dict[str, tp.TrainState], data: tf.data.Dataset) -> Runner:
    """The composition tfpure offered before make_step: two compiled full-control steps,
    called one after the other from a Python step function (two graph calls per batch)."""
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
    batches = iter(data.repeat())

    def run(n: int) -> None:
        g.reset_metrics()
        d.reset_metrics()
        for _ in range(n):
            real = next(batches)
            d_step(d, real)
            g_step(g, real)
        float(g.metrics["loss"].result())

    return run


def measure_gan(rounds: int) -> BenchResult:
    """Seconds per GAN step (one batch, both updates) of each variant, interleaved."""
    return compare(
        gan_states,
        gan_body,
        gan_data(),
        variants={
            "GAN two-call composition": Variant(custom=gan_composed),
            "GAN make_step k=1": Variant(steps_per_call=1),
            "GAN make_step k=16": Variant(steps_per_call=16),
        },
        rounds=rounds,
        steps=GAN_STEPS,
        title=f"GAN ({GAN_STEPS} batches of {GAN_BATCH}, both updates)",
    )


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


def gflops(result: BenchResult) -> dict:
    """The compute MLP's GFLOP/s, beside the bare matmul's measured in the same rounds.

    From median and from minimum step times, and ``paired_fraction``: the
    median over rounds of a variant's GFLOP/s over the matmul's in that round.
    """
    flops = matmul_flops_per_step(compute_mlp(), WORKLOADS["compute_mlp"]["batch"])
    names = [v for v in result.variants if v != MATMUL]
    out: dict = {
        stat: {
            "matmul": MATMUL_FLOPS / values[MATMUL] / 1e9,
            "variants": {name: flops / values[name] / 1e9 for name in names},
        }
        for stat, values in (("median", result.median), ("min", result.minimum))
    }
    matmul = result.rounds[MATMUL]
    out["paired_fraction"] = {
        name: statistics.median(
            flops * m / (MATMUL_FLOPS * v) for m, v in zip(matmul, result.rounds[name], strict=True)
        )
        for name in names
    }
    return out


# -- report -----------------------------------------------------------------------------


MEM = "in_memory_mlp"
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
    ("guard cost, tutorial MLP", "tutorial_mlp", "tfpure k=1", "tfpure k=1 no guard", 1.05),
    ("guard cost, k=16, tutorial MLP", "tutorial_mlp", "tfpure k=16", "tfpure k=16 no guard", 1.03),
    (
        "XLA k=1 / graph k=1, tutorial MLP (Dropout)",
        "tutorial_mlp",
        "tfpure XLA k=1",
        "tfpure k=1",
        1.0,
    ),
    ("XLA k=1 / graph k=1, compute MLP", "compute_mlp", "tfpure XLA k=1", "tfpure k=1", 1.0),
    (
        "tfpure XLA k=16 fed the tutorial's pipeline / JAX + optax x16 fed batches in memory",
        "tutorial_mlp",
        "tfpure XLA k=16",
        JAX,
        1.5,
    ),
    ("tfpure XLA k=16 / JAX + optax x16, batches in memory", MEM, "tfpure XLA k=16", JAX, 1.15),
    ("tfpure XLA k=16 on arrays / JAX + optax x16, batches in memory", MEM, ARRAYS, JAX, 1.15),
    ("tfpure XLA k=16 on arrays, shuffled / in order", MEM, SHUFFLED, ARRAYS, None),
    (
        "tfpure XLA k=16 no guard / JAX + optax x16, batches in memory",
        MEM,
        "tfpure XLA k=16 no guard",
        JAX,
        1.2,
    ),
    ("tfpure k=16 / JAX + optax x16, batches in memory", MEM, "tfpure k=16", JAX, None),
    (
        "tutorial MLP: tfpure auto / the best of tfpure k=1, k=16, XLA k=1, XLA k=16",
        "tutorial_mlp",
        AUTO,
        ("tfpure k=1", "tfpure k=16", "tfpure XLA k=1", "tfpure XLA k=16"),
        1.05,
    ),
    (
        "guard cost, XLA k=16, batches in memory",
        MEM,
        "tfpure XLA k=16",
        "tfpure XLA k=16 no guard",
        1.03,
    ),
    (
        "guard cost, XLA k=16, tutorial MLP",
        "tutorial_mlp",
        "tfpure XLA k=16",
        "tfpure XLA k=16 no guard",
        1.03,
    ),
    (
        "XLA k=16 with a Checkpointer / without, tutorial MLP",
        "tutorial_mlp",
        CHECKPOINTED,
        "tfpure XLA k=16",
        1.02,
    ),
    ("guard cost, compute MLP", "compute_mlp", "tfpure k=16", "tfpure k=16 no guard", 1.03),
    (
        "guard cost, XLA k=16, compute MLP",
        "compute_mlp",
        "tfpure XLA k=16",
        "tfpure XLA k=16 no guard",
        1.03,
    ),
    (
        "distributed path, 1 replica / plain",
        "tutorial_mlp",
        "tfpure k=1 Mirrored, 1 replica",
        "tfpure k=1",
        1.2,
    ),
    *(row for model in REAL_MODELS for row in real_model_ratios(model)),
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


def ratios(results: dict[str, BenchResult]) -> dict[str, dict]:
    """Each ratio three ways; the goal is judged on the paired one.

    ``paired`` is the median over rounds of the ratio within a round (the
    two variants measured seconds apart, so a machine slowdown lasting a few
    seconds cancels); ``of_medians`` and ``of_minimums`` compare the
    variants' medians and best rounds.
    """
    out = {}
    for name, workload, num, den, goal in RATIOS:
        r = results[workload]
        if not isinstance(den, str):  # the best (by median) of hand-picked configurations
            den = min((d for d in den if d in r.variants), key=r.median.__getitem__)
        if num not in r.variants or den not in r.variants:  # JAX not installed
            continue
        paired = r.paired(num, den)
        out[name] = {
            "paired": round(paired, 3),
            "of_medians": round(r.median[num] / r.median[den], 3),
            "of_minimums": round(r.minimum[num] / r.minimum[den], 3),
            "goal": goal,
            "met": goal is None or paired <= goal,
            **({"best": den, "chose": r.chosen[num]} if num in r.chosen else {}),
        }
    return out


def markdown(report: dict, results: dict[str, BenchResult]) -> str:
    references = {
        "tutorial_mlp": "tfpure k=1",
        MEM: None,
        "compute_mlp": "tfpure k=1",
        "mobilenet": "tfpure k=1",
        "transformer": "tfpure k=1",
        "gan": None,
    }
    lines = [results[w].to_markdown(reference=references[w]) for w in results]
    lines += [
        "| ratio (one run) | paired: median of per-round ratios | goal "
        "| ratio of medians | ratio of minimums |",
        "|---|---:|---|---:|---:|",
    ]
    for name, r in report["ratios"].items():
        goal = "" if r["goal"] is None else f"<= {r['goal']}" + ("" if r["met"] else " (missed)")
        if "chose" in r:
            jit, k = r["chose"]
            name = f"{name} (chose jit_compile={jit}, k={k}; best {r['best']})"
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
        f"JAX reference: {report['jax']}",
        "",
        "Traces and memory: " + ", ".join(f"{k} = {v:.4g}" for k, v in report["memory"].items()),
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in report["machine"].items()),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=15,
        help="measured rounds of the compute-bound MLP (the tutorial MLP and the GAN, whose "
        "steps are short, run twice as many)",
    )
    parser.add_argument(
        "--rss-steps",
        type=int,
        default=20_000,
        help="training steps over which the RSS growth is measured",
    )
    parser.add_argument("--quick", action="store_true", help="3 rounds, 2,000 RSS steps")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: a new benchmarks/runs/<UTC time>; "
        "benchmarks/results holds the figures the README quotes)",
    )
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.rss_steps = 3, 2_000
    out = args.out or HERE / "runs" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out.mkdir(parents=True, exist_ok=True)

    results = {
        # Overhead-bound rounds are short and their ratios are small differences: twice as many.
        "tutorial_mlp": measure_tutorial(2 * args.rounds),
        MEM: measure_in_memory(2 * args.rounds),
        "compute_mlp": measure_compute(args.rounds),
        "gan": measure_gan(2 * args.rounds),
        # Real models: long steps, long traces (each variant traces its own step).
        "mobilenet": measure_real_model("mobilenet", max(3, args.rounds // 3)),
        "transformer": measure_real_model("transformer", max(3, args.rounds // 3)),
    }
    report = {
        "machine": machine(),
        "jax": jax_missing
        or "JAX + optax, jit(lax.scan) over 16 pre-stacked batches "
        "(workloads tutorial_mlp, in_memory_mlp)",
        "rounds": {name: len(r.rounds[r.variants[0]]) for name, r in results.items()},
        "steps": {name: dict(r.steps) for name, r in results.items()},
        "per_step_seconds": {
            name: {
                v: {"median": r.median[v], "min": r.minimum[v], "rounds": list(r.rounds[v])}
                for v in r.variants
            }
            for name, r in results.items()
        },
        "outside_steps_seconds_per_round": {
            name: {v: statistics.median(o) for v, o in r.outside.items()}
            for name, r in results.items()
        },
        "ratios": ratios(results),
        "gflops": gflops(results["compute_mlp"]),
        "memory": traces_and_memory(args.rss_steps),
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report, results)
    (out / "results.md").write_text(table)
    print(table)
    try:
        plot(
            {
                "tutorial MLP": results["tutorial_mlp"],
                "tutorial MLP, batches in memory": results[MEM],
                "compute MLP": results["compute_mlp"],
            },
            out / "chart.png",
        )
        plot({results["gan"].title: results["gan"]}, out / "chart_gan.png")
        plot({results[w].title: results[w] for w in REAL_MODELS}, out / "chart_models.png")
        print(f"charts: {out / 'chart.png'}, {out / 'chart_gan.png'}, {out / 'chart_models.png'}")
    except ImportError as e:
        print(f"no chart: {e}")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
