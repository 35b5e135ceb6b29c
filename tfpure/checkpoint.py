"""`Checkpointer`: save everything that decides the future of a run, resume exactly.

Synopsis::

    ckpt = tp.Checkpointer("runs/1", save_every_steps=500)
    state, history = tp.fit_loop(state, train_ds, train_step, epochs=10, checkpoint=ckpt)
    # killed at any point? run the same command again: it resumes at the last
    # save, mid-epoch included, and ends with the variables of an unbroken run.

    ckpt.save(state)          # by hand
    ckpt.restore(state)       # by hand: the newest good checkpoint, or None

A checkpoint holds every variable that decides what happens next: the model's
variables (BatchNorm statistics, and Dropout's `SeedGenerator` states, which
`tf.train.Checkpoint(model=...)` would miss), the optimizer's slots and
iteration count, training and evaluation metrics, `state.step`,
`state.skipped`, `state.rng`, and the loop's position (epoch, step in the
epoch, history so far). The data iterator itself is not saved: a resumed
`fit_loop` rebuilds it by replay (see `_Run`), which TensorFlow's iterator
checkpoints cannot match for reshuffled data.

Invariants:
  * a restore is all or nothing: every variable it would touch is copied
    first and put back if any part of the restore fails;
  * only complete checkpoints are listed (`tf.train.CheckpointManager`
    updates its index after the files are written), and a listed checkpoint
    whose files do not read back (truncated, corrupted) is skipped with a
    warning in favour of the previous one;
  * a checkpoint of another architecture is refused with an error naming the
    first variable that does not match, before anything is restored.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tfpure.state import TrainState

__all__ = ["CheckpointError", "Checkpointer", "Preempted"]


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not fit the state."""


class Preempted(SystemExit):
    """`fit_loop` received SIGTERM, finished its step and saved; the process should end.

    A `SystemExit` with code 143 (128 + SIGTERM): left uncaught, the process
    exits quietly with that code; run the same command again to resume.
    """

    def __init__(self, path: str):
        super().__init__(143)
        self.path = path


def _groups(state: TrainState) -> dict[str, list[Any]]:
    """The state's variables, grouped and ordered as they are saved."""
    return {
        "model": list(state.model.variables),
        "optimizer": list(state.optimizer.variables),
        "metrics": [v for m in state.metrics.values() for v in m.variables],
        "eval_metrics": [v for m in state.eval_metrics.values() for v in m.variables],
        "counters": [state.step, state.skipped, state.rng.state],
    }


def _name(variable: Any) -> str:
    return getattr(variable, "path", None) or variable.name


def _layout(groups: dict[str, list[Any]]) -> dict[str, list[list[Any]]]:
    return {
        group: [[_name(v), list(v.shape), tf.as_dtype(v.dtype).name] for v in variables]
        for group, variables in groups.items()
    }


def _mismatch(saved: dict[str, list[list[Any]]], mine: dict[str, list[list[Any]]]) -> str | None:
    """Names the first difference between two layouts (shapes and dtypes by position)."""
    for group in ("model", "optimizer", "metrics", "eval_metrics", "counters"):
        a, b = saved.get(group, []), mine[group]
        if len(a) != len(b):
            return (
                f"the checkpoint holds {len(a)} {group} variables, the state {len(b)} "
                f"(first of the checkpoint: {[x[0] for x in a[:3]]}; of the state: "
                f"{[x[0] for x in b[:3]]})"
            )
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x[1:] != y[1:]:
                return (
                    f"{group} variable {i}: the checkpoint's {x[0]} has shape {tuple(x[1])} "
                    f"and dtype {x[2]}, the state's {y[0]} has shape {tuple(y[1])} and dtype {y[2]}"
                )
    return None


class Checkpointer:
    """Saves and restores a `TrainState`, and lets `fit_loop` resume a run exactly.

    Built on `tf.train.Checkpoint` and `tf.train.CheckpointManager`. Pass it
    as ``fit_loop(..., checkpoint=ckpt)``: on start, `fit_loop` restores the
    newest good checkpoint in `directory` and continues from that exact step,
    mid-epoch included, so that over the whole run each batch is trained
    exactly once; it saves every `save_every_steps` steps, every
    `save_every_epochs` epochs, at the end, and on SIGTERM (then raises
    `Preempted`). A run that already finished does nothing when run again.

    Args:
      directory: where checkpoints live (created if needed).
      max_to_keep: newest checkpoints kept; older ones are deleted.
      save_every_steps: save after every this many training steps (None: not
        by steps). With ``steps_per_call > 1`` calls are cut short to land
        on these steps.
      save_every_epochs: save at the end of every this many epochs (None:
        not by epochs).

    Example:
      >>> import keras, tempfile, tfpure as tp
      >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
      >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.Adam())
      >>> ckpt = tp.Checkpointer(tempfile.mkdtemp(), max_to_keep=2)
      >>> path = ckpt.save(state)
      >>> saved = model.get_weights()
      >>> _ = model.layers[0].kernel.assign(keras.ops.zeros((2, 1)))
      >>> ckpt.restore(state) == path
      True
      >>> all((a == b).all() for a, b in zip(model.get_weights(), saved))
      True
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_to_keep: int = 3,
        save_every_steps: int | None = None,
        save_every_epochs: int | None = 1,
    ):
        for name, value, optional in (
            ("max_to_keep", max_to_keep, False),
            ("save_every_steps", save_every_steps, True),
            ("save_every_epochs", save_every_epochs, True),
        ):
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"`{name}` must be an int >= 1{' or None' * optional}; got {value!r}."
                )
        self.directory = os.fspath(directory)
        self.max_to_keep = max_to_keep
        self.save_every_steps = save_every_steps
        self.save_every_epochs = save_every_epochs
        # The loop's position and record, saved with the state.
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.epoch_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch_step")
        self.history = tf.Variable("{}", trainable=False, name="history")
        self._layout = tf.Variable("", trainable=False, name="layout")
        self._managed: tuple[TrainState, tf.train.CheckpointManager] | None = None

    # -- the checkpoint object ----------------------------------------------------

    def _manager(self, state: TrainState) -> tf.train.CheckpointManager:
        if self._managed is None or self._managed[0] is not state:
            checkpoint = tf.train.Checkpoint(
                **_groups(state),
                loop=[self.epoch, self.epoch_step, self.history],
                layout=self._layout,
            )
            manager = tf.train.CheckpointManager(
                checkpoint, self.directory, max_to_keep=self.max_to_keep, checkpoint_name="ckpt"
            )
            self._managed = (state, manager)
        return self._managed[1]

    def checkpoints(self) -> list[str]:
        """The complete checkpoints in `directory`, newest first.

        Example:
          >>> import tempfile, tfpure as tp
          >>> tp.Checkpointer(tempfile.mkdtemp()).checkpoints()
          []
        """
        found = tf.train.get_checkpoint_state(self.directory)
        if found is None:
            return []
        # get_checkpoint_state has already joined relative paths to `directory`.
        paths = list(found.all_model_checkpoint_paths) or [found.model_checkpoint_path]
        return list(reversed(paths))

    # -- save ---------------------------------------------------------------------

    def save(self, state: TrainState) -> str:
        """Writes a checkpoint of `state` (and the loop's position); returns its path.

        Example:
          >>> import keras, tempfile, tfpure as tp
          >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
          >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())
          >>> ckpt = tp.Checkpointer(tempfile.mkdtemp())
          >>> os.path.basename(ckpt.save(state))
          'ckpt-0'
        """
        self._layout.assign(json.dumps(_layout(_groups(state))))
        return self._manager(state).save(checkpoint_number=int(state.step.numpy()))

    # -- restore ------------------------------------------------------------------

    def _check(self, path: str, state: TrainState) -> None:
        """Raises `tf.errors.OpError` if the files do not read back, `CheckpointError`
        if they hold another architecture."""
        reader = tf.train.load_checkpoint(path)
        for key in reader.get_variable_to_dtype_map():
            reader.get_tensor(key)
        saved = reader.get_tensor("layout/.ATTRIBUTES/VARIABLE_VALUE")
        problem = _mismatch(json.loads(saved), _layout(_groups(state)))
        if problem:
            raise CheckpointError(
                f"Checkpoint {path} does not fit this state: {problem}. It was written "
                "for another model, optimizer or set of metrics."
            )

    def restore(self, state: TrainState) -> str | None:
        """Restores the newest good checkpoint into `state` (and the loop's position).

        Returns:
          The path restored, or None if `directory` holds no checkpoint.

        Raises:
          CheckpointError: checkpoints exist but none reads back, or the newest
            readable one was written for another architecture. Nothing changed.

        Example:
          >>> import keras, tempfile, tfpure as tp
          >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
          >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())
          >>> print(tp.Checkpointer(tempfile.mkdtemp()).restore(state))
          None
        """
        paths = self.checkpoints()
        if not paths:
            return None
        variables = [v for vs in _groups(state).values() for v in vs]
        variables += [self.epoch, self.epoch_step, self.history]
        failures = []
        for path in paths:
            try:
                self._check(path, state)
            except CheckpointError:
                raise
            except Exception as err:  # the reader raises OpError, IndexError, ...
                failures.append(f"{path}: {type(err).__name__}: {str(err).splitlines()[0]}")
                warnings.warn(
                    f"Checkpoint {path} does not read back ({failures[-1]}); trying the "
                    "previous one.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            backup = [np.array(v.numpy(), copy=True) for v in variables]
            try:
                self._manager(state).checkpoint.restore(path).assert_existing_objects_matched()
            except (tf.errors.OpError, AssertionError, ValueError) as err:
                for v, value in zip(variables, backup, strict=True):
                    v.assign(value)
                failures.append(f"{path}: {type(err).__name__}: {str(err).splitlines()[0]}")
                warnings.warn(
                    f"Checkpoint {path} failed to restore ({failures[-1]}); nothing was "
                    "changed; trying the previous one.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            return path
        raise CheckpointError(
            f"No checkpoint in {self.directory} can be restored; nothing was changed:\n  "
            + "\n  ".join(failures)
        )

    # -- the loop's record ----------------------------------------------------------

    def recorded_history(self) -> dict[str, list[float]]:
        """The history of the epochs completed so far in this run (as restored)."""
        return json.loads(self.history.numpy().decode())

    def record(self, history: dict[str, Sequence[float]]) -> None:
        self.history.assign(json.dumps({k: [float(x) for x in v] for k, v in history.items()}))

    def _begin(self, state: TrainState, data: tf.data.Dataset, steps_per_epoch: int | None) -> _Run:
        return _Run(self, state, data, steps_per_epoch)

    def __repr__(self) -> str:
        return (
            f"Checkpointer({self.directory!r}, max_to_keep={self.max_to_keep}, "
            f"save_every_steps={self.save_every_steps}, "
            f"save_every_epochs={self.save_every_epochs})"
        )


def _unreplayable(data: tf.data.Dataset) -> str | None:
    """Why `data` might not yield the same batches when rebuilt, or None.

    A resumed run replays the data to its position, so the pipeline must be
    a pure function of its seeds: no state outside TensorFlow (py_function,
    from_generator, stateful random ops in `map`) and no unseeded shuffle.
    """
    serialize = getattr(data, "_as_serialized_graph", None)
    if serialize is None:  # Not this TensorFlow's internals: no check.
        return None
    try:
        graph = serialize(external_state_policy=tf.data.experimental.ExternalStatePolicy.FAIL)
    except tf.errors.OpError:
        return (
            "it holds state outside TensorFlow (tf.py_function, Dataset.from_generator, "
            "or stateful random ops such as tf.random.uniform inside map)"
        )
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(graph.numpy())
    nodes = {node.name: node for node in graph_def.node}

    def const(name: str) -> int | None:
        node = nodes.get(name.split(":")[0].lstrip("^"))
        if node is None or node.op != "Const":
            return None
        return int(tf.make_ndarray(node.attr["value"].tensor))

    for node in graph_def.node:
        if (
            node.op.startswith("ShuffleDataset")
            and const(node.input[2]) == const(node.input[3]) == 0
        ):
            return "it shuffles without a seed (pass shuffle(..., seed=...))"
    return None


@tf.function(autograph=False)
def _skip(iterator: Any, n: tf.Tensor) -> tf.Tensor:
    """Pulls `n` batches from `iterator` in one graph call; returns how many there were."""

    def body(i: tf.Tensor) -> tuple[tf.Tensor]:
        return (i + tf.cast(iterator.get_next_as_optional().has_value(), tf.int32),)

    return tf.while_loop(lambda i: i < n, body, (tf.constant(0),))[0]


class _Run:
    """`fit_loop`'s view of a checkpointed run: where to start, when to save.

    The data iterator is not saved: TensorFlow's iterator checkpoints do not
    restore reshuffle seeds exactly near the end of an epoch. The run saves
    its position (epoch, step in the epoch) and rebuilds the iterator by
    replay: it creates the past epochs' iterators (which draws their
    reshuffle seeds, as the interrupted run did) without reading them, then
    pulls the current epoch's finished batches in-graph without training on
    them. With ``steps_per_epoch`` (one iterator over the repeated data) the
    replay pulls every batch of the run so far. This needs a pipeline that is
    a pure function of its seeds, which `_unreplayable` checks up front.
    """

    def __init__(
        self,
        ckpt: Checkpointer,
        state: TrainState,
        data: tf.data.Dataset,
        steps_per_epoch: int | None,
    ):
        if not isinstance(data, tf.data.Dataset):
            raise TypeError(
                "Checkpointed training needs `data` as a tf.data.Dataset: a resumed run "
                f"replays it to the saved position. Got {type(data).__name__}."
            )
        cardinality = int(data.cardinality())
        if steps_per_epoch is None and cardinality < 1:
            raise ValueError(
                "Checkpointed training needs the epoch length: the dataset's cardinality "
                "is unknown or infinite. Pass steps_per_epoch=, or declare it with "
                "dataset.apply(tf.data.experimental.assert_cardinality(n))."
            )
        reason = _unreplayable(data)
        if reason:
            raise CheckpointError(
                "The training data cannot be checkpointed: a resumed run replays it to the "
                f"saved position, but {reason}, so the replay could differ from the run "
                "it resumes. Build it from seeded TensorFlow ops, or train without a "
                "Checkpointer."
            )
        self.ckpt, self.state, self.data = ckpt, state, data
        self.stream = steps_per_epoch is not None
        self.steps_per_epoch = steps_per_epoch or cardinality
        self.path = ckpt.restore(state)
        if self.path is None:
            ckpt.epoch.assign(0)
            ckpt.epoch_step.assign(0)
            ckpt.record({})
        self.first_epoch = int(ckpt.epoch.numpy())
        self.first_step = int(ckpt.epoch_step.numpy())
        self.prior = ckpt.recorded_history()
        self._stream: Any = None
        self.preempted = False
        self._previous_handler: Any = None
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        del signum, frame
        self.preempted = True

    def start(self, epoch: int) -> int:
        """Steps already done in `epoch` (non-zero only for a resumed epoch)."""
        return self.first_step if epoch == self.first_epoch else 0

    def iterator(self, epoch: int) -> Any:
        """The data iterator for `epoch`, positioned where the run resumes."""
        if self.stream:
            if self._stream is None:
                source = self.data
                if int(source.cardinality()) != tf.data.INFINITE_CARDINALITY:
                    source = source.repeat()
                self._stream = iter(source)
                done = self.first_epoch * self.steps_per_epoch + self.first_step
                self._replay(self._stream, done)
            return self._stream
        if epoch == self.first_epoch:
            for _ in range(epoch):
                iter(self.data)  # draws that epoch's reshuffle seeds
        iterator = iter(self.data)
        self._replay(iterator, self.start(epoch))
        return iterator

    @staticmethod
    def _replay(iterator: Any, n: int) -> None:
        if n and int(_skip(iterator, tf.constant(n, tf.int32))) != n:
            raise CheckpointError(
                f"The training data ran out while replaying {n} batches to the saved "
                "position: it is not the data the checkpointed run was trained on."
            )

    def steps_to_save(self, epoch: int, done: int) -> int | None:
        """Steps from here to the next step-based save, to cut fused calls short."""
        every = self.ckpt.save_every_steps
        if every is None:
            return None
        position = epoch * self.steps_per_epoch + done
        return every - position % every

    def after_call(self, epoch: int, done: int) -> None:
        """Saves on a step-based boundary; on SIGTERM, saves and raises `Preempted`."""
        every = self.ckpt.save_every_steps
        position = epoch * self.steps_per_epoch + done
        if self.preempted or (every is not None and position % every == 0):
            self.ckpt.epoch_step.assign(done)
            self._save(f"after step {done} of epoch {epoch}")

    def end_epoch(self, epoch: int, history: dict[str, list[float]], last: bool) -> None:
        """Records the finished epoch and saves if it is a save point."""
        self.ckpt.epoch.assign(epoch + 1)
        self.ckpt.epoch_step.assign(0)
        self.ckpt.record(history)
        every = self.ckpt.save_every_epochs
        if last or self.preempted or (every is not None and (epoch + 1) % every == 0):
            self._save(f"at the end of epoch {epoch}")

    def _save(self, where: str) -> None:
        path = self.ckpt.save(self.state)
        if self.preempted:
            print(
                f"tfpure: SIGTERM received; saved {path} {where}. Run the same command "
                "again to resume.",
                file=sys.stderr,
            )
            raise Preempted(path)

    def close(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
