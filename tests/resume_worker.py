"""Checkpointed training runs that tests kill and restart, as separate processes.

    python tests/resume_worker.py DIR OUT [--kill KIND:N] [--steps-per-call K] [--jit] [--gan]
                                  [--steps N --eval-every M]
    python tests/resume_worker.py --jobs JOBS.json
    python tests/resume_worker.py --fork KILLS.json RESULTS.json [JOBS.json]

trains a Dropout + BatchNorm model (or, with ``--gan``, a GAN written with
`tp.make_step`, whose discriminator has Dropout, whose noise comes from the
generator state's seed generator, whose generator's moving average is a state
that is not trained, and whose generator loss is logged on even steps only)
on arrays shuffled each epoch (``batch_size=8, shuffle=7``; the GAN: on a
reshuffled dataset), with a ragged last batch, checkpointing to DIR, and
writes its final variables, step count and history to OUT (.npz). ``--steps``
trains a step budget with evaluation windows of ``--eval-every`` steps instead
of ``--epochs``, and an action every 3 steps records the steps it saw (in OUT's ``fired``).
``--kill`` makes the process kill itself:

  step:N         SIGKILL after the N-th training step (global steps, counted in-process)
  epoch:E        SIGKILL as epoch E begins, right after the previous epoch's end and save
  after_save:K   SIGKILL right after the K-th save of this process returns
  during_save:K  SIGKILL in the K-th save, after the files are written and before the
                 checkpoint index names them
  sigterm:N      send itself SIGTERM after the N-th step (a preemption)
  sigterm2:N     the same, twice, and once more after `Preempted` (while winding down)

``--jobs`` runs several uninterrupted runs one after the other in this one
process (a JSON list of ``[DIR, OUT, [options...]]``): the tests resume many
killed runs with one interpreter start. A run that fails writes its traceback
to ``OUT.error`` and the others go on. Every run rebuilds its models from
fixed seeds, so a run in a shared process computes what it would alone.

``--fork`` runs each of KILLS.json's ``[NAME, DIR, OUT, [options...]]`` in a
child forked from this process (three at a time), writes each child's exit
code and stderr to RESULTS.json, then runs JOBS.json as ``--jobs`` does. The
children are forked after TensorFlow is imported but before it starts its
runtime, so each is a fresh run that skips the import (seconds per process).
"""

import argparse
import json
import os
import signal
import sys
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

import tfpure as tp

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
BCE = keras.losses.BinaryCrossentropy(from_logits=True)


def build(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16, "relu", kernel_regularizer=keras.regularizers.L2(1e-3)),
            keras.layers.Dropout(0.3),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(3),
        ]
    )


def data() -> tuple[tuple[np.ndarray, np.ndarray], tf.data.Dataset, tf.data.Dataset]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(70, 6)).astype("float32")
    y = rng.integers(0, 3, size=70).astype("int32")
    arrays = (x[:60], y[:60])  # what the runs but the GAN's train on, with batch_size=8
    train = (
        tf.data.Dataset.from_tensor_slices(arrays)
        .shuffle(60, seed=7, reshuffle_each_iteration=True)
        .batch(8)  # 8 batches, the last one of 4
        .prefetch(2)
    )
    val = tf.data.Dataset.from_tensor_slices((x[60:], y[60:])).batch(4)
    return arrays, train, val


def gan_states() -> dict[str, tp.TrainState]:
    keras.utils.set_random_seed(0)
    g = keras.Sequential([keras.Input((3,)), keras.layers.Dense(8, "tanh"), keras.layers.Dense(6)])
    d = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, "relu"), keras.layers.Dropout(0.3),
         keras.layers.Dense(1)]
    )  # fmt: skip
    return {
        "g": tp.TrainState.create(model=g, optimizer=keras.optimizers.Adam(0.01), seed=0),
        "d": tp.TrainState.create(model=d, optimizer=keras.optimizers.Adam(0.01), seed=1),
        # The generator's moving average: a state that is not trained, saved with the run.
        "ema": tp.TrainState.create(model=keras.models.clone_model(g), optimizer=None),
    }


def gan_step(states, batch):
    g, d = states["g"], states["d"]
    real, _ = batch
    n = tf.shape(real)[0]
    with tf.GradientTape() as tape:
        real_logits = d.model(real, training=True)
        fake = g.model(keras.random.normal((n, 3), seed=g.rng), training=True)
        fake_logits = d.model(fake, training=True)
        d_loss = BCE(tf.ones_like(real_logits), real_logits) + BCE(
            tf.zeros_like(fake_logits), fake_logits
        )
    d = d.apply_gradients(tape.gradient(d_loss, d.model.trainable_variables))
    with tf.GradientTape() as tape:
        fake = g.model(keras.random.normal((n, 3), seed=g.rng), training=True)
        logits = d.model(fake, training=True)
        g_loss = BCE(tf.ones_like(logits), logits)
    g = g.apply_gradients(tape.gradient(g_loss, g.model.trainable_variables))
    ema = tp.ema(states["ema"], g, 0.9)
    # A log the odd steps leave out: its epoch mean is over the even ones.
    return {"g": g, "d": d, "ema": ema}, {
        "d_loss": d_loss,
        "g_loss": tp.log_if(d.step % 2 == 0, g_loss),
    }


class Kill(keras.callbacks.Callback):
    def __init__(self, counter: tf.Variable, kind: str, n: int):
        super().__init__()
        self.counter, self.kind, self.n = counter, kind, n

    def on_train_batch_end(self, batch, logs=None):
        if self.kind in ("step", "sigterm", "sigterm2") and int(self.counter) == self.n:
            os.kill(os.getpid(), signal.SIGKILL if self.kind == "step" else signal.SIGTERM)
            if self.kind == "sigterm2":
                os.kill(os.getpid(), signal.SIGTERM)

    def on_epoch_begin(self, epoch, logs=None):
        if self.kind == "epoch" and epoch == self.n:
            os.kill(os.getpid(), signal.SIGKILL)


def patch_saves(kind: str, n: int) -> None:
    """Kills the process around the n-th save."""
    from tensorflow.python.checkpoint import checkpoint_management

    saves = [0]
    save = tf.train.CheckpointManager.save
    record = checkpoint_management.update_checkpoint_state_internal

    def counted_save(self, *args, **kwargs):
        saves[0] += 1
        path = save(self, *args, **kwargs)
        if kind == "after_save" and saves[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    def dying_record(*args, **kwargs):
        if kind == "during_save" and saves[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return record(*args, **kwargs)

    tf.train.CheckpointManager.save = counted_save
    checkpoint_management.update_checkpoint_state_internal = dying_record


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("directory")
    p.add_argument("out")
    p.add_argument("--kill", default="")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--steps-per-call", type=int, default=1)
    p.add_argument("--jit", action="store_true")  # jit_compile=True
    p.add_argument("--gan", action="store_true")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    return p


def run(args: argparse.Namespace) -> None:
    # The shuffle's seed derives from the global seed: fix it before building the data,
    # so that a run in a shared process (--jobs) draws what a run alone draws.
    keras.utils.set_random_seed(0)
    arrays, train, val = data()
    fed = {}
    if args.gan:
        state = gan_states()
        counter = state["g"].step
        step = tp.make_step(gan_step, steps_per_call=args.steps_per_call, jit_compile=args.jit)
        val = None
    else:
        state = tp.TrainState.create(
            model=build(),
            optimizer=keras.optimizers.Adam(0.01),
            metrics={"accuracy": keras.metrics.SparseCategoricalAccuracy()},
            seed=0,
        )
        counter = state.step
        train, fed = arrays, {"batch_size": 8, "shuffle": 7}
        step = tp.make_train_step(SCCE, steps_per_call=args.steps_per_call, jit_compile=args.jit)
    callbacks = []
    if args.kill:
        kind, n = args.kill.split(":")
        if kind in ("after_save", "during_save"):
            patch_saves(kind, int(n))
        else:
            callbacks.append(Kill(counter, kind, int(n)))
    ckpt = tp.Checkpointer(args.directory, save_every_steps=args.every, max_to_keep=3)
    fired: list[tuple[int, int]] = []
    if args.steps:
        schedule = {"steps": args.steps, "eval_every": args.eval_every}
        record = tp.every(3, lambda state, n, logs: fired.append((n, int(counter))))
    else:
        schedule, record = {"epochs": args.epochs}, None
    state, history = tp.fit_loop(
        state,
        train,
        step,
        **schedule,
        **fed,
        val_data=val,
        callbacks=callbacks,
        actions=[record] if record else [],
        checkpoint=ckpt,
        verbose=0,
    )
    states = state if args.gan else {"": state}
    arrays = {}
    for name, s in states.items():
        arrays.update({f"{name}v{i}": v.numpy() for i, v in enumerate(s.model.variables)})
        arrays[f"{name}rng"] = s.rng.state.numpy()
        if s.optimizer is None:  # (not trained: no updates to count)
            continue
        arrays[f"{name}step"] = int(s.step)
        arrays.update({f"{name}o{i}": v.numpy() for i, v in enumerate(s.optimizer.variables)})
    if args.steps:
        arrays["fired"] = np.array(fired, dtype=np.int64).reshape(-1, 2)
    np.savez(args.out, history=np.array([history[k] for k in sorted(history)]), **arrays)


def run_jobs(path: str) -> None:
    """Runs each job; a job that fails writes its traceback to OUT.error, and the rest go on
    (so that each test reading a job's OUT fails on its own, with that job's error)."""
    with open(path) as f:
        jobs = json.load(f)
    for directory, out, options in jobs:
        try:
            run(parser().parse_args([directory, out, *options]))
        except Exception:
            with open(f"{out}.error", "w") as f:
                f.write(traceback.format_exc())


def child(directory: str, out: str, options: list[str], stderr: str) -> None:
    """The body of a forked child: one run, its stderr to a file; never returns."""
    fd = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    code = 0
    try:
        tf.config.experimental.enable_op_determinism()
        run(parser().parse_args([directory, out, *options]))
    except SystemExit as err:  # Preempted: exit 143, as an unforked process would
        code = err.code if isinstance(err.code, int) else 1
        if "sigterm2:" in " ".join(options):  # and one more SIGTERM while it winds down
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(2)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stderr.flush()
    os._exit(code)


def fork_runs(kills: str, results: str, parallel: int = 3) -> None:
    with open(kills) as f:
        pending = json.load(f)
    running: dict[int, tuple[str, str]] = {}
    ended: dict[str, tuple[int, str]] = {}
    while pending or running:
        while pending and len(running) < parallel:
            name, directory, out, options = pending.pop(0)
            stderr = f"{out}.stderr"
            pid = os.fork()
            if pid == 0:
                child(directory, out, options, stderr)
            running[pid] = (name, stderr)
        pid, status = os.wait()
        name, stderr = running.pop(pid)
        with open(stderr) as f:
            ended[name] = (os.waitstatus_to_exitcode(status), f.read())
    with open(results, "w") as f:
        json.dump(ended, f)


def main() -> None:
    if sys.argv[1:2] == ["--fork"]:
        fork_runs(sys.argv[2], sys.argv[3])  # before TensorFlow's runtime starts
        tf.config.experimental.enable_op_determinism()
        if len(sys.argv) > 4:
            run_jobs(sys.argv[4])
        sys.exit(0)
    tf.config.experimental.enable_op_determinism()
    if sys.argv[1:2] == ["--jobs"]:
        run_jobs(sys.argv[2])
    else:
        run(parser().parse_args())
    sys.exit(0)


if __name__ == "__main__":
    main()
