"""One training run under a tf.distribute strategy, or on one device, as a process.

    python tests/distributed_worker.py MODE OUT [--epochs E] [--steps-per-call K]
                                               [--checkpoint DIR] [--nan-batch I] [--gan]
                                               [--two-outputs]
    python tests/distributed_worker.py MODE --jobs JOBS.json
    python tests/distributed_worker.py --fork MODE:JOBS.json[@TF_CONFIG.json] [...]

``--jobs`` runs several runs one after the other in one process, one strategy
(a JSON list of ``[OUT, [options...]]``); a run that resumes from a checkpoint
directory reads it afresh, as a new process would. ``--fork`` runs each
MODE's jobs in a child forked from this process after TensorFlow is imported
and before its runtime starts (so each child picks its own devices; a
``multiworker`` child takes its TF_CONFIG from the file after ``@``), one
interpreter start for all; it fails if any child fails.

MODE is ``single`` (one device), ``mirrored`` (MirroredStrategy over two
logical CPU devices) or ``multiworker`` (MultiWorkerMirroredStrategy; the
cluster comes from TF_CONFIG). Writes the final variables and history to OUT
(.npz) — in ``multiworker`` mode, only the chief (worker 0) writes.

``--gan`` trains a GAN written with `tp.make_step` instead (and the generator's EMA, a
state that is not trained; its generator loss logged on even steps);
``--two-outputs`` a two-output model with compile-style losses, loss weights,
metrics and weighted metrics, on sample-weighted batches.

The model has no Dropout (each replica would draw its own masks) and a
synchronized BatchNorm (statistics over the global batch), so every mode
computes the same function of the same global batches.
"""

import argparse
import json
import os
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

import tfpure as tp
from tfpure.state import variable_groups

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def data(nan_batch=None):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(74, 6)).astype("float32")
    y = rng.integers(0, 3, size=74).astype("int32")
    if nan_batch is not None:
        x[nan_batch * 8] = np.nan
    # 61 examples in batches of 8: the last of 5 splits 3/2 over two replicas.
    train = tf.data.Dataset.from_tensor_slices((x[:61], y[:61])).shuffle(61, seed=3).batch(8)
    val = tf.data.Dataset.from_tensor_slices((x[61:], y[61:])).batch(8)
    return train, val


def build():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16, "relu", kernel_regularizer=keras.regularizers.L2(1e-3)),
            keras.layers.BatchNormalization(synchronized=True),
            keras.layers.Dense(3),
        ]
    )


BCE = keras.losses.BinaryCrossentropy(from_logits=True, reduction=None)
TRACED_REPLICAS = []  # the replica count each trace of the GAN body saw


def gan_states():
    keras.utils.set_random_seed(0)
    g = keras.Sequential([keras.Input((3,)), keras.layers.Dense(8, "tanh"), keras.layers.Dense(6)])
    d = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, "relu"), keras.layers.Dense(1)])
    return {
        "g": tp.TrainState.create(model=g, optimizer=keras.optimizers.Adam(0.01)),
        "d": tp.TrainState.create(model=d, optimizer=keras.optimizers.Adam(0.01)),
        # The generator's moving average: a state that is not trained, mirrored too.
        "ema": tp.TrainState.create(model=keras.models.clone_model(g), optimizer=None),
    }


def gan_step(states, batch):
    """Noise comes with the batch, so every replica count sees the same numbers; the
    per-example losses are averaged over the global batch with replica_mean."""
    TRACED_REPLICAS.append(tf.distribute.get_replica_context().num_replicas_in_sync)
    g, d = states["g"], states["d"]
    real, z = batch
    with tf.GradientTape() as tape:
        real_logits = d.model(real, training=True)
        fake_logits = d.model(g.model(z, training=True), training=True)
        d_loss = tp.distribute.replica_mean(
            BCE(tf.ones_like(real_logits), real_logits)
        ) + tp.distribute.replica_mean(BCE(tf.zeros_like(fake_logits), fake_logits))
    d = d.apply_gradients(tape.gradient(d_loss, d.model.trainable_variables))
    with tf.GradientTape() as tape:
        logits = d.model(g.model(z, training=True), training=True)
        g_loss = tp.distribute.replica_mean(BCE(tf.ones_like(logits), logits))
    g = g.apply_gradients(tape.gradient(g_loss, g.model.trainable_variables))
    ema = tp.ema(states["ema"], g, 0.9)
    logs = {"d_loss": d_loss, "g_loss": tp.log_if(g.step % 2 == 0, g_loss)}  # even steps'
    return {"g": g, "d": d, "ema": ema}, logs


def gan_data():
    rng = np.random.default_rng(1)
    real = rng.normal(1.0, 0.5, size=(61, 6)).astype("float32")
    z = rng.normal(size=(61, 3)).astype("float32")
    return tf.data.Dataset.from_tensor_slices((real, z)).shuffle(61, seed=3).batch(8)


def run_gan(args, strategy):
    with strategy.scope():
        states = gan_states()
    step = tp.make_step(gan_step, steps_per_call=args.steps_per_call)
    fired = []  # (step, generator's step, examples per step since the last run)

    def record(states, n, logs):
        per_step = logs["examples_per_second"] / logs["steps_per_second"]
        fired.append((n, int(states["g"].step.numpy()), per_step))

    states, history = tp.fit_loop(
        states, gan_data(), step, epochs=args.epochs, actions=[tp.every(5, record)], verbose=0
    )
    np.savez(
        args.out,
        fired=np.array(fired),
        replicas=strategy.num_replicas_in_sync,
        traced=np.array(TRACED_REPLICAS),
        history=np.array([history[k] for k in sorted(history)]),
        **{f"{name}step": int(s.step.numpy()) for name, s in states.items()},
        **{
            f"{name}{i}": v.numpy()
            for name, s in states.items()
            for i, v in enumerate([*s.model.variables, *variable_groups(s)["optimizer"]])
        },
    )


def run_two_outputs(args, strategy):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        x = keras.Input((6,))
        h = keras.layers.Dense(16, "relu")(x)
        model = keras.Model(x, {"kind": keras.layers.Dense(3)(h), "size": keras.layers.Dense(1)(h)})
        state = tp.TrainState.create(
            model=model,
            optimizer=keras.optimizers.Adam(0.01),
            metrics={"kind": "accuracy"},
            weighted_metrics={"size": ["mae"]},
        )
    rng = np.random.default_rng(2)
    features = rng.normal(size=(61, 6)).astype("float32")
    targets = {"kind": rng.integers(0, 3, 61), "size": features[:, :1] * 2.0}
    weights = rng.uniform(0.5, 1.5, 61).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((features, targets, weights)).batch(8)
    loss = {"kind": SCCE, "size": "mse"}
    weighting = {"kind": 1.0, "size": 0.5}
    state, history = tp.fit_loop(
        state,
        data,
        tp.make_train_step(loss, loss_weights=weighting),
        epochs=args.epochs,
        eval_step=tp.make_eval_step(loss, loss_weights=weighting),
        val_data=data,
        verbose=0,
    )
    np.savez(
        args.out,
        replicas=strategy.num_replicas_in_sync,
        step=int(state.step.numpy()),
        skipped=0,
        keys=np.array(sorted(history)),
        history=np.array([history[k] for k in sorted(history)]),
        **{f"v{i}": v.numpy() for i, v in enumerate(state.model.variables)},
    )


def strategy_for(mode):
    if mode == "single":
        return tf.distribute.get_strategy()
    if mode == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
        return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    return tf.distribute.MultiWorkerMirroredStrategy()


def parser():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["single", "mirrored", "multiworker"])
    p.add_argument("out")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps-per-call", type=int, default=1)
    p.add_argument("--checkpoint")
    p.add_argument("--nan-batch", type=int)
    p.add_argument("--gan", action="store_true")
    p.add_argument("--diagnose", action="store_true")
    p.add_argument("--two-outputs", action="store_true")
    return p


def diagnose(args, strategy):
    """A NaN in the last replica's shard only, under "raise", with a BatchNorm that is not
    synchronized (each replica keeps statistics of its own shard): writes the guard's message,
    whether every replica's copy of every variable is unchanged, and whether the replicas'
    BatchNorm copies differed (else the check would prove nothing)."""
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(5),
                keras.layers.BatchNormalization(),
                keras.layers.Dense(3),
            ]
        )
        state = tp.TrainState.create(model=model, optimizer=keras.optimizers.Adam(0.01))
    x, y = (np.array(t) for t in next(iter(data()[0])))
    step = tp.make_train_step(SCCE)
    state, _ = step(state, (x, y))

    def copies():
        return {v.path: [c.numpy() for c in v.value.values] for v in model.variables}

    before = copies()
    x[-1] = np.nan  # the last replica's share of the batch
    try:
        step(state, (x, y))
        message = "no error"
    except tp.NonFiniteError as err:
        message = str(err)
    after = copies()
    np.savez(
        args.out,
        message=message,
        unchanged=all(
            np.array_equal(a, b) for k in before for a, b in zip(before[k], after[k], strict=True)
        ),
        differed=not np.array_equal(*before[model.layers[1].moving_mean.path]),
        step=int(state.step.numpy()),
    )


def run(args, strategy):
    if args.diagnose:
        diagnose(args, strategy)
        return
    if args.two_outputs:
        run_two_outputs(args, strategy)
        return
    if args.gan:
        TRACED_REPLICAS.clear()
        run_gan(args, strategy)
        return
    with strategy.scope():
        state = tp.TrainState.create(
            model=build(),
            optimizer=keras.optimizers.Adam(0.01),
            metrics={"accuracy": keras.metrics.SparseCategoricalAccuracy()},
        )
    train, val = data(args.nan_batch)
    nonfinite = "skip" if args.nan_batch is not None else "raise"
    trained = []  # the steps this run trained (a resumed run trains the rest only)

    class Count(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            trained.append(batch)

    state, history = tp.fit_loop(
        state,
        train,
        tp.make_train_step(SCCE, steps_per_call=args.steps_per_call, nonfinite=nonfinite),
        epochs=args.epochs,
        val_data=val,
        callbacks=[Count()],
        checkpoint=tp.Checkpointer(args.checkpoint) if args.checkpoint else None,
        verbose=0,
    )
    replicas = strategy.num_replicas_in_sync
    chief = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {}).get("index", 0) == 0
    if chief:
        np.savez(
            args.out,
            replicas=replicas,
            trained=len(trained),
            step=int(state.step.numpy()),
            skipped=int(state.skipped.numpy()),
            history=np.array([history[k] for k in sorted(history)]),
            **{f"v{i}": v.numpy() for i, v in enumerate(state.model.variables)},
        )


def main():
    if sys.argv[1:2] == ["--fork"]:
        children = []
        for spec in sys.argv[2:]:
            mode, jobs = spec.split(":", 1)
            jobs, _, config = jobs.partition("@")
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    if config:
                        with open(config) as f:
                            os.environ["TF_CONFIG"] = f.read()
                    run_jobs(mode, jobs)
                except BaseException:
                    traceback.print_exc()
                    code = 1
                sys.stderr.flush()
                os._exit(code)
            children.append(pid)
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
        sys.exit(max(abs(c) for c in codes))
    if sys.argv[2:3] == ["--jobs"]:  # MODE --jobs FILE: several runs, one process
        run_jobs(sys.argv[1], sys.argv[3])
    else:
        tf.config.experimental.enable_op_determinism()
        args = parser().parse_args()
        run(args, strategy_for(args.mode))
    sys.exit(0)


def run_jobs(mode, path):
    tf.config.experimental.enable_op_determinism()
    strategy = strategy_for(mode)
    with open(path) as f:
        for out, options in json.load(f):
            run(parser().parse_args([mode, out, *options]), strategy)


if __name__ == "__main__":
    main()
