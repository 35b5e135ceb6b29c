"""A checkpointed training run that tests kill and restart, as a separate process.

    python tests/resume_worker.py DIR OUT [--kill KIND:N] [--epochs E] [--every S]

trains a Dropout + BatchNorm model on a reshuffled dataset with a ragged last
batch, checkpointing to DIR, and writes its final variables and step count to
OUT (.npz). ``--kill`` makes the process SIGKILL itself:

  step:N         after the N-th training step (N = global steps, counted in-process)
  epoch:E        as epoch E begins, right after the previous epoch's end and save
  after_save:K   right after the K-th save of this process returns
  during_save:K  in the K-th save, after the files are written and before the
                 checkpoint index names them
  sigterm:N      send itself SIGTERM after the N-th step (a preemption)
"""

import argparse
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

import tfpure as tp

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


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


def data() -> tuple[tf.data.Dataset, tf.data.Dataset]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(70, 6)).astype("float32")
    y = rng.integers(0, 3, size=70).astype("int32")
    train = (
        tf.data.Dataset.from_tensor_slices((x[:60], y[:60]))
        .shuffle(60, seed=7, reshuffle_each_iteration=True)
        .batch(8)  # 8 batches, the last one of 4
        .prefetch(2)
    )
    val = tf.data.Dataset.from_tensor_slices((x[60:], y[60:])).batch(4)
    return train, val


class Kill(keras.callbacks.Callback):
    def __init__(self, state: tp.TrainState, kind: str, n: int):
        super().__init__()
        self.state, self.kind, self.n = state, kind, n

    def on_train_batch_end(self, batch, logs=None):
        if self.kind in ("step", "sigterm") and int(self.state.step) == self.n:
            os.kill(os.getpid(), signal.SIGKILL if self.kind == "step" else signal.SIGTERM)

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("out")
    parser.add_argument("--kill", default="")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--steps-per-call", type=int, default=1)
    args = parser.parse_args()
    tf.config.experimental.enable_op_determinism()

    train, val = data()
    state = tp.TrainState.create(
        model=build(),
        optimizer=keras.optimizers.Adam(0.01),
        metrics={"accuracy": keras.metrics.SparseCategoricalAccuracy()},
        seed=0,
    )
    callbacks = []
    if args.kill:
        kind, n = args.kill.split(":")
        if kind in ("after_save", "during_save"):
            patch_saves(kind, int(n))
        else:
            callbacks.append(Kill(state, kind, int(n)))
    ckpt = tp.Checkpointer(args.directory, save_every_steps=args.every, max_to_keep=3)
    state, history = tp.fit_loop(
        state,
        train,
        tp.make_train_step(SCCE, steps_per_call=args.steps_per_call),
        epochs=args.epochs,
        val_data=val,
        callbacks=callbacks,
        checkpoint=ckpt,
        verbose=0,
    )
    np.savez(
        args.out,
        step=int(state.step),
        history=np.array([history[k] for k in sorted(history)]),
        **{f"v{i}": v.numpy() for i, v in enumerate(state.model.variables)},
        **{f"o{i}": v.numpy() for i, v in enumerate(state.optimizer.variables)},
    )
    sys.exit(0)


if __name__ == "__main__":
    main()
