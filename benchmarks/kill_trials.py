"""Kill trials: SIGKILL a checkpointed `fit_loop` run at random points; the resumed run must
end bit-identical to an unbroken one.

    python benchmarks/kill_trials.py [--trials 20] [--seed 0] [--out benchmarks/results]

Each trial starts a fresh run in its own process and kills it with SIGKILL, at a random
moment or at a chosen point: inside a save (after the data files are written, before the
index lists them), right after a save, or while the resumed process replays the data to
its saved position. Half of the trials kill the resuming process again. The run is then
started once more, to the end, and its variables (model, optimizer slots, seed generator,
step counters) and history are compared bit for bit with an uninterrupted run's.

The run: 480 examples in shuffled batches of 16 (30 a epoch, the order drawn afresh each
epoch), 8 epochs, a Dense + Dropout + BatchNorm model, Adam, a save every 7 steps and at
every epoch's end, two checkpoints kept. Prints a summary; with ``--out`` also writes
``kill_trials.json`` and ``kill_trials.md`` there.
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


def child(directory: str, out: str, kill: str) -> None:
    """One run, resumed from `directory` if a checkpoint is there; dies at `kill` if given."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    import tensorflow as tf

    import tfpure as tp
    from tfpure.state import owned_variables

    if kill:
        arm(kill)
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(EXAMPLES, 8)).astype("float32")
    y = rng.integers(0, 4, size=EXAMPLES).astype("int32")
    data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(EXAMPLES, seed=1).batch(BATCH)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(32, "relu"),
            keras.layers.Dropout(0.3),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(4),
        ]
    )
    state = tp.TrainState.create(
        model=model,
        optimizer=keras.optimizers.Adam(0.01),
        metrics={"accuracy": keras.metrics.SparseCategoricalAccuracy()},
        seed=0,
    )
    state, history = tp.fit_loop(
        state,
        data,
        tp.make_train_step(keras.losses.SparseCategoricalCrossentropy(from_logits=True)),
        epochs=EPOCHS,
        checkpoint=tp.Checkpointer(directory, save_every_steps=SAVE_EVERY, max_to_keep=2),
        verbose=0,
    )
    arrays = {f"v{i}": v.numpy() for i, v in enumerate(owned_variables(state))}
    np.savez(out, history=np.array([history[k] for k in sorted(history)]), **arrays)


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


def launch(directory: str, out: str, kill: str = "") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, "--child", directory, out, kill],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    _, err = process.communicate(timeout=timeout)
    return process.returncode, err


def trial(rng: random.Random, work: Path, reference: dict, duration: float) -> dict:
    """One trial: one or two kills, then a run to the end; compared with the reference."""
    import numpy as np

    directory, out = str(work / "ckpt"), str(work / "out.npz")
    saves = EPOCHS * (EXAMPLES // BATCH) // SAVE_EVERY
    kills = []
    for attempt in range(1 + (rng.random() < 0.5)):
        point = rng.choice(POINTS if attempt else POINTS[:3])  # replay needs a checkpoint
        if point == "random":
            process = launch(directory, out)
            delay = rng.uniform(0.2, 1.1) * duration
            try:
                process.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
            code, err = finish(process)
            kills.append({"point": f"random at {delay:.1f} s", "code": code})
        else:
            kill = f"{point}:{rng.randint(1, saves)}" if point != "in-replay" else f"{point}:1"
            code, err = finish(launch(directory, out, kill))
            kills.append({"point": kill, "code": code})
        if code not in (-signal.SIGKILL, 0):
            return {"kills": kills, "failed": err[-2000:]}
        if os.path.exists(out):  # it ended before the kill: start over
            os.remove(out)
    code, err = finish(launch(directory, out))
    if code != 0:
        return {"kills": kills, "failed": err[-2000:]}
    with np.load(out) as f:
        got = {k: f[k] for k in f.files}
    mismatched = [k for k in reference if not np.array_equal(got.get(k), reference[k])]
    return {"kills": kills, "mismatched": mismatched}


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(*sys.argv[2:5])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="a directory for kill_trials.json and kill_trials.md")
    args = p.parse_args()
    import numpy as np

    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="tfpure-kills-"))
    try:
        start = time.perf_counter()
        code, err = finish(launch(str(root / "ref"), str(root / "ref.npz")))
        duration = time.perf_counter() - start
        if code != 0:
            sys.exit(f"the uninterrupted run failed:\n{err[-3000:]}")
        with np.load(root / "ref.npz") as f:
            reference = {k: f[k] for k in f.files}
        results = []
        for i in range(args.trials):
            work = root / f"t{i}"
            work.mkdir()
            results.append(trial(rng, work, reference, duration))
            r = results[-1]
            verdict = "FAILED" if "failed" in r else "MISMATCH" if r["mismatched"] else "equal"
            print(f"trial {i}: {[k['point'] for k in r['kills']]} -> {verdict}", flush=True)
            shutil.rmtree(work)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    kills = [k for r in results for k in r["kills"] if k["code"] == -signal.SIGKILL]
    summary = {  # kills that struck (a run may end before its kill point)
        "trials": len(results),
        "kills": len(kills),
        "by point": {p: sum(k["point"].startswith(p) for k in kills) for p in POINTS},
        "mismatches": sum(bool(r.get("mismatched")) for r in results),
        "failures": sum("failed" in r for r in results),
        "seed": args.seed,
        "uninterrupted run (s)": round(duration, 1),
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "kill_trials.json").write_text(json.dumps({**summary, "results": results}, indent=1))
        (out / "kill_trials.md").write_text(
            f"Kill trials (`python benchmarks/kill_trials.py --trials {len(results)} --seed "
            f"{args.seed}`): {summary['trials']} trials, {summary['kills']} SIGKILLs "
            f"({', '.join(f'{n} {p}' for p, n in summary['by point'].items())}); "
            f"{summary['mismatches']} mismatches, {summary['failures']} failures.\n"
        )
    sys.exit(1 if summary["mismatches"] or summary["failures"] else 0)


if __name__ == "__main__":
    main()
