"""Kill trials: SIGKILL a checkpointed `fit_loop` run at random points; the resumed run must
end bit-identical to an unbroken one.

    python benchmarks/kill_trials.py [--trials 20] [--configs ...] [--seed 0] [--out DIR]

Each trial starts a fresh run in its own process and kills it with SIGKILL, at a random
moment or at a chosen point: inside a save (after the data files are written, before the
index lists them), right after a save, or while the resumed process replays the data to
its saved position. Half of the trials kill the resuming process again. The run is then
started once more, to the end, and its variables (model, optimizer slots, seed generator,
step counters) and history are compared bit for bit with an uninterrupted run's.

The runs: 480 examples in shuffled batches of 16 (30 a epoch, the order drawn afresh each
epoch), Adam, a save every 7 steps and at every window's end, two checkpoints kept; each
configuration (``--configs``, all by default):

  * ``epochs``: 8 epochs of a Dense + Dropout + BatchNorm classifier;
  * ``xla-budget``: the same model, ``jit_compile=True``, 4 steps a call, a budget of 200
    steps in evaluation windows of 60 (the last one short), with validation;
  * ``gan-skips``: a two-state GAN (`make_step`, 4 steps a call, Dropout, noise from the
    generator state's seed generator) with ``nonfinite="skip"`` and six NaN examples;
  * ``two-outputs``: a compile-style two-output model (a loss each, loss weights, a
    metric and a weighted metric, sample weights);
  * ``actions``: the classifier, with an action lowering the learning rate every 5 steps.

Prints a summary; with ``--out`` also writes ``kill_trials.json`` and ``kill_trials.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EPOCHS, EXAMPLES, BATCH, SAVE_EVERY = 8, 480, 16, 7
POINTS = ("random", "in-save", "after-save", "in-replay")
# Each run's configuration, and its saves (the in-save and after-save kills pick one).
CONFIGS = {
    "epochs": EPOCHS * (EXAMPLES // BATCH) // SAVE_EVERY,
    "xla-budget": 200 // SAVE_EVERY,  # 200 steps, XLA, 4 steps a call, windows of 60
    "gan-skips": EPOCHS * (EXAMPLES // BATCH) // SAVE_EVERY,
    "two-outputs": EPOCHS * (EXAMPLES // BATCH) // SAVE_EVERY,
    "actions": EPOCHS * (EXAMPLES // BATCH) // SAVE_EVERY,
}


def child(directory: str, out: str, kill: str, config: str) -> None:
    """One run, resumed from `directory` if a checkpoint is there; dies at `kill` if given."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tensorflow as tf

    import tfpure as tp
    from tfpure.state import leaves, owned_variables

    if kill:
        arm(kill)
    tf.config.experimental.enable_op_determinism()
    state, data, step, options = build(config)
    state, history = tp.fit_loop(
        state,
        data,
        step,
        checkpoint=tp.Checkpointer(directory, save_every_steps=SAVE_EVERY, max_to_keep=2),
        verbose=0,
        **options,
    )
    variables = [v for s in leaves(state) for v in owned_variables(s)]
    arrays = {f"v{i}": v.numpy() for i, v in enumerate(variables)}
    np.savez(out, history=np.array([history[k] for k in sorted(history)]), **arrays)


def build(config: str) -> tuple:
    """The run of `config`: (state or states, data, step, fit_loop's further arguments)."""
    import keras
    import numpy as np
    import tensorflow as tf

    import tfpure as tp

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(EXAMPLES, 8)).astype("float32")
    y = rng.integers(0, 4, size=EXAMPLES).astype("int32")
    scce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def shuffled(*arrays):
        data = tf.data.Dataset.from_tensor_slices(arrays).shuffle(EXAMPLES, seed=1)
        return data.batch(BATCH)

    def classifier():
        return keras.Sequential(
            [
                keras.Input((8,)),
                keras.layers.Dense(32, "relu"),
                keras.layers.Dropout(0.3),
                keras.layers.BatchNormalization(),
                keras.layers.Dense(4),
            ]
        )

    def state_of(model, **kwargs):
        return tp.TrainState.create(model=model, optimizer=keras.optimizers.Adam(0.01), **kwargs)

    accuracy = {"accuracy": keras.metrics.SparseCategoricalAccuracy()}
    if config == "epochs":
        return (
            state_of(classifier(), metrics=accuracy, seed=0),
            shuffled(x, y),
            (tp.make_train_step(scce)),
            {"epochs": EPOCHS},
        )
    if config == "xla-budget":
        step = tp.make_train_step(scce, jit_compile=True, steps_per_call=4)
        val = tf.data.Dataset.from_tensor_slices((x[:64], y[:64])).batch(BATCH)
        options = {"steps": 200, "eval_every": 60, "val_data": val}
        return state_of(classifier(), metrics=accuracy, seed=0), shuffled(x, y), step, options
    if config == "actions":  # a learning rate lowered by an action every 5 steps

        def lower(state, step, logs):
            state.optimizer.learning_rate.assign(state.optimizer.learning_rate * 0.97)

        options = {"epochs": EPOCHS, "actions": [tp.every(5, lower)]}
        return state_of(classifier(), seed=0), shuffled(x, y), tp.make_train_step(scce), options
    if config == "two-outputs":  # compile-style: two losses, weights, weighted metrics
        inputs = keras.Input((8,))
        hidden = keras.layers.Dropout(0.2)(keras.layers.Dense(16, "relu")(inputs))
        outputs = {
            "kind": keras.layers.Dense(4, name="kind")(hidden),
            "size": keras.layers.Dense(1, name="size")(hidden),
        }
        model = keras.Model(inputs, outputs)
        state = state_of(
            model,
            metrics={"kind": "accuracy"},
            weighted_metrics={"size": "mae"},
            seed=0,
        )
        step = tp.make_train_step(
            loss={"kind": scce, "size": "mse"}, loss_weights={"kind": 1.0, "size": 0.5}
        )
        targets = {"kind": y, "size": x[:, :1] * 2.0}
        weights = rng.uniform(0.5, 1.5, EXAMPLES).astype("float32")
        data = tf.data.Dataset.from_tensor_slices((x, targets, weights))
        return state, data.shuffle(EXAMPLES, seed=1).batch(BATCH), step, {"epochs": EPOCHS}
    if config == "gan-skips":  # two states, Dropout, noise from a saved seed, NaN batches
        real = x[:, :6].copy()
        real[rng.choice(EXAMPLES, 6, replace=False)] = np.nan
        g = keras.Sequential(
            [keras.Input((3,)), keras.layers.Dense(8, "tanh"), keras.layers.Dense(6)]
        )
        d = keras.Sequential(
            [keras.Input((6,)), keras.layers.Dense(8, "relu"), keras.layers.Dropout(0.3),
             keras.layers.Dense(1)]
        )  # fmt: skip
        states = {"g": state_of(g, seed=0), "d": state_of(d, seed=1)}
        bce = keras.losses.BinaryCrossentropy(from_logits=True)

        def gan_step(states, batch):
            g, d = states["g"], states["d"]
            (real,) = batch
            n = tf.shape(real)[0]
            with tf.GradientTape() as tape:
                real_logits = d.model(real, training=True)
                fake = g.model(keras.random.normal((n, 3), seed=g.rng), training=True)
                fake_logits = d.model(fake, training=True)
                d_loss = bce(tf.ones_like(real_logits), real_logits)
                d_loss += bce(tf.zeros_like(fake_logits), fake_logits)
            d = d.apply_gradients(tape.gradient(d_loss, d.model.trainable_variables))
            with tf.GradientTape() as tape:
                logits = d.model(g.model(keras.random.normal((n, 3), seed=g.rng)), training=True)
                g_loss = bce(tf.ones_like(logits), logits)
            g = g.apply_gradients(tape.gradient(g_loss, g.model.trainable_variables))
            return {"g": g, "d": d}, {"d_loss": d_loss, "g_loss": g_loss}

        step = tp.make_step(gan_step, nonfinite="skip", steps_per_call=4)
        return states, shuffled(real), step, {"epochs": EPOCHS}
    raise ValueError(f"no configuration {config!r}; the configurations: {list(CONFIGS)}")


def arm(kill: str) -> None:
    """Makes this process SIGKILL itself at a chosen point: ``POINT:N`` (the N-th time)."""
    import tensorflow as tf
    from tensorflow.python.checkpoint import checkpoint_management

    import tfpure.stream

    point, n = kill.split(":")
    count = [0]

    def die_on(k: int) -> None:
        if k == int(n):
            os.kill(os.getpid(), signal.SIGKILL)

    if point in ("in-save", "after-save"):
        save, index = tf.train.CheckpointManager.save, checkpoint_management
        record = index.update_checkpoint_state_internal

        def counted(self, *args, **kwargs):
            count[0] += 1
            path = save(self, *args, **kwargs)
            if point == "after-save":
                die_on(count[0])
            return path

        def recording(*args, **kwargs):  # the data files are written; the index is next
            if point == "in-save":
                die_on(count[0])
            return record(*args, **kwargs)

        tf.train.CheckpointManager.save = counted
        index.update_checkpoint_state_internal = recording
    elif point == "in-replay":
        skip = tfpure.stream._skip

        def replaying(iterator, k):
            if int(k) > 1:  # half-way: replay half, then die
                skip(iterator, k // 2)
                os.kill(os.getpid(), signal.SIGKILL)
            return skip(iterator, k)

        tfpure.stream._skip = replaying


def launch(directory: str, out: str, config: str, kill: str = "") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, "--child", directory, out, kill, config],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    _, err = process.communicate(timeout=timeout)
    return process.returncode, err


def trial(rng: random.Random, work: Path, config: str, reference: dict, duration: float) -> dict:
    """One trial: one or two kills, then a run to the end; compared with the reference."""
    import numpy as np

    directory, out = str(work / "ckpt"), str(work / "out.npz")
    saves = CONFIGS[config]
    kills = []
    for attempt in range(1 + (rng.random() < 0.5)):
        point = rng.choice(POINTS if attempt else POINTS[:3])  # replay needs a checkpoint
        if point == "random":
            process = launch(directory, out, config)
            delay = rng.uniform(0.2, 1.1) * duration
            try:
                process.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
            code, err = finish(process)
            kills.append({"point": f"random at {delay:.1f} s", "code": code})
        else:
            kill = f"{point}:{rng.randint(1, saves)}" if point != "in-replay" else f"{point}:1"
            code, err = finish(launch(directory, out, config, kill))
            kills.append({"point": kill, "code": code})
        if code not in (-signal.SIGKILL, 0):
            return {"kills": kills, "failed": err[-2000:]}
        if os.path.exists(out):  # it ended before the kill: start over
            os.remove(out)
    code, err = finish(launch(directory, out, config))
    if code != 0:
        return {"kills": kills, "failed": err[-2000:]}
    with np.load(out) as f:
        got = {k: f[k] for k in f.files}
    mismatched = [k for k in reference if not np.array_equal(got.get(k), reference[k])]
    return {"kills": kills, "mismatched": mismatched}


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(*sys.argv[2:6])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20, help="trials of each configuration")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="a directory for kill_trials.json and kill_trials.md")
    args = p.parse_args()
    rng = random.Random(args.seed)
    summaries = [run_config(config, args.trials, rng) for config in args.configs]
    print(json.dumps(summaries, indent=1))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "kill_trials.json").write_text(
            json.dumps({"seed": args.seed, "configs": summaries}, indent=1)
        )
        lines = [
            f"Kill trials (`python benchmarks/kill_trials.py --trials {args.trials} --seed "
            f"{args.seed}`), per configuration:",
            "",
            "| Configuration | Trials | SIGKILLs (by point) | Mismatches | Failures |",
            "|---|---|---|---|---|",
        ]
        for s in summaries:
            points = ", ".join(f"{n} {p}" for p, n in s["by point"].items())
            lines.append(
                f"| {s['config']} | {s['trials']} | {s['kills']} ({points}) | "
                f"{s['mismatches']} | {s['failures']} |"
            )
        (out / "kill_trials.md").write_text("\n".join(lines) + "\n")
    failed = any(s["mismatches"] or s["failures"] for s in summaries)
    sys.exit(1 if failed else 0)


def run_config(config: str, trials: int, rng: random.Random) -> dict:
    """The trials of one configuration, against its uninterrupted run: a summary."""
    import numpy as np

    root = Path(tempfile.mkdtemp(prefix="tfpure-kills-"))
    try:
        start = time.perf_counter()
        code, err = finish(launch(str(root / "ref"), str(root / "ref.npz"), config))
        duration = time.perf_counter() - start
        if code != 0:
            sys.exit(f"the uninterrupted {config} run failed:\n{err[-3000:]}")
        with np.load(root / "ref.npz") as f:
            reference = {k: f[k] for k in f.files}
        results = []
        for i in range(trials):
            work = root / f"t{i}"
            work.mkdir()
            results.append(trial(rng, work, config, reference, duration))
            r = results[-1]
            verdict = "FAILED" if "failed" in r else "MISMATCH" if r["mismatched"] else "equal"
            print(f"{config} trial {i}: {[k['point'] for k in r['kills']]} -> {verdict}",
                  flush=True)  # fmt: skip
            shutil.rmtree(work)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    kills = [k for r in results for k in r["kills"] if k["code"] == -signal.SIGKILL]
    return {  # kills that struck (a run may end before its kill point)
        "config": config,
        "trials": len(results),
        "kills": len(kills),
        "by point": {p: sum(k["point"].startswith(p) for k in kills) for p in POINTS},
        "mismatches": sum(bool(r.get("mismatched")) for r in results),
        "failures": sum("failed" in r for r in results),
        "uninterrupted run (s)": round(duration, 1),
        "results": results,
    }


if __name__ == "__main__":
    main()
