"""Resuming a checkpointed `fit_loop` run exactly: restore, data checks, saves, SIGTERM.

`fit_loop(..., checkpoint=ckpt)` links its loop to the checkpointer through
a `Run`: it checks that the data can be replayed, restores the newest good
checkpoint (the loop's `tfpure.stream.DataStream` replays the data to its
position), saves the positions the loop hands it, and turns SIGTERM into a
save followed by `Preempted`.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import IO, Any

import keras
import tensorflow as tf

from tfpure.checkpoint import (
    Checkpointer,
    CheckpointError,
    read_record,
    saved_variables,
    write_record,
)
from tfpure.compat import dataset_op_inputs, serialized_dataset_graph
from tfpure.distribute import cluster_task, strategy_of
from tfpure.record import Record
from tfpure.state import leaves

__all__ = ["Preempted", "Run"]


class Preempted(SystemExit):
    """`fit_loop` received SIGTERM, finished its step and saved; the process should end.

    A `SystemExit` with code 143 (128 + SIGTERM): left uncaught, the process
    exits quietly with that code; run the same command again to resume.
    `path` is the checkpoint it saved.

    Example:
      >>> import tfpure as tp
      >>> err = tp.Preempted("runs/1/ckpt-40")
      >>> isinstance(err, SystemExit), err.code, err.path
      (True, 143, 'runs/1/ckpt-40')
    """

    def __init__(self, path: str):
        super().__init__(143)
        self.path = path


def _dataset_graph(data: tf.data.Dataset) -> tuple[list[Any], Callable[[str], int | None]]:
    """The nodes of `data`'s graph, and ``const(input)``: an input's integer value, or None
    if it is not a constant. Raises `tf.errors.OpError` for state outside TensorFlow."""
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(serialized_dataset_graph(data).numpy())
    nodes = {node.name: node for node in graph_def.node}

    def const(name: str) -> int | None:
        node = nodes.get(name.split(":")[0].lstrip("^"))
        if node is None or node.op != "Const":
            return None
        return int(tf.make_ndarray(node.attr["value"].tensor))

    return list(graph_def.node), const


def _unreplayable(data: tf.data.Dataset) -> str | None:
    """Why `data` might not yield the same batches when rebuilt, or None.

    A resumed run replays the data to its position, so the pipeline must be
    a pure function of its seeds: no state outside TensorFlow (py_function,
    from_generator, stateful random ops in `map`), no unseeded shuffle and no
    unseeded random dataset (`Dataset.random`, `sample_from_datasets`).
    """
    try:
        graph, const = _dataset_graph(data)
    except tf.errors.OpError:
        return (
            "it holds state outside TensorFlow (tf.py_function, Dataset.from_generator, "
            "or stateful random ops such as tf.random.uniform inside map)"
        )
    for node in graph:
        if not node.op.startswith(_SEEDED):
            continue
        inputs = dataset_op_inputs(node)
        if inputs is None or "seed" not in inputs or "seed2" not in inputs:
            # Fails closed: seeds tfpure cannot find might be unset.
            return (
                f"tfpure cannot read the seeds of its {node.op} op in this TensorFlow "
                f"({tf.__version__})"
            )
        if const(inputs["seed"]) == const(inputs["seed2"]) == 0:
            if node.op.startswith("RandomDataset"):
                return (
                    "it draws from an unseeded random dataset (pass seed=... to "
                    "Dataset.random or Dataset.sample_from_datasets)"
                )
            return "it shuffles without a seed (pass shuffle(..., seed=...))"
    return None


# Random ops that keep their state in the op, or in a `tf.random.Generator` (no state
# holds one): a checkpoint cannot save it, so a resumed run draws other numbers.
_STATEFUL_RANDOM = frozenset(
    {
        "Multinomial",
        "ParameterizedTruncatedNormal",
        "RandomGamma",
        "RandomPoisson",
        "RandomPoissonV2",
        "RandomShuffle",
        "RandomStandardNormal",
        "RandomUniform",
        "RandomUniformInt",
        "StatefulRandomBinomial",
        "StatefulStandardNormalV2",
        "StatefulTruncatedNormal",
        "StatefulUniform",
        "StatefulUniformFullInt",
        "StatefulUniformInt",
        "TruncatedNormal",
    }
)


def _tf_variables(variable: Any) -> list[Any]:
    """The TensorFlow variables behind a Keras or TensorFlow variable (one per device)."""
    inner = variable.value if isinstance(variable, keras.Variable) else variable
    return [variable, inner, *getattr(inner, "values", ())]


def unsaved_randomness(traced: Any, saved: Sequence[Any]) -> list[str]:
    """The random sources a traced step draws from that the `saved` variables leave out.

    A resumed run draws other numbers from them than the interrupted run
    would have: stateful random ops (``tf.random.normal``: their state lives
    in the op) and Keras seed generators that are not saved (``keras.random``
    ops without ``seed=``, which draw from Keras' global one).

    Example:
      >>> import keras, tensorflow as tf
      >>> from tfpure.resume import unsaved_randomness
      >>> noise = tf.function(
      ...     lambda: tf.random.normal([2]) + keras.random.normal([2]), autograph=False)
      >>> unsaved_randomness(noise.get_concrete_function(), saved=[])
      ['tf.raw_ops.RandomStandardNormal', 'seed_generator...seed_generator_state']
    """
    if traced is None:
        return []
    graph = traced.graph.as_graph_def()
    ops = {node.op for node in graph.node}
    ops |= {node.op for function in graph.library.function for node in function.node_def}
    found = [f"tf.raw_ops.{op}" for op in sorted(ops & _STATEFUL_RANDOM)]
    kept = {id(part) for v in saved for part in _tf_variables(v)}
    for v in traced.variables:
        name = v.name.removesuffix(":0")
        if "seed_generator_state" in name and id(v) not in kept:
            found.append(name)
    return found


def _warn_of_unsaved_randomness(traced: Any, saved: Sequence[Any]) -> None:
    unsaved = unsaved_randomness(traced, saved)
    if unsaved:
        warnings.warn(
            f"The step draws random numbers from {', '.join(unsaved)}, whose state no "
            "checkpoint saves: a resumed run draws other numbers than this one would "
            "have, so it is not an exact resume. Draw them from a state's saved seed "
            "generator instead: keras.random.normal(shape, seed=state.rng).",
            RuntimeWarning,
            stacklevel=5,
        )


LOCK_FILE = ".tfpure.lock"


def _exit_preempted(signum: int, frame: Any) -> None:
    """SIGTERM after a preemption was saved: the exit `Preempted` was making, now."""
    del signum, frame
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(143)


def _lock(directory: str) -> IO[str] | None:
    """Takes `directory`'s lock file (creating both), or raises `CheckpointError`.

    The lock is an advisory ``flock`` held while the run trains: a second
    run writing the same directory (another process, or another loop in
    this one) is refused before anything changes, and a directory that
    cannot be written is found at the start rather than at the first save.
    """
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        return None
    path = os.path.join(directory, LOCK_FILE)
    try:
        os.makedirs(directory, exist_ok=True)
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held for the run)
    except OSError as err:
        why = err.strerror
        if os.path.islink(directory) and not os.path.exists(directory):
            why = f"it is a symbolic link to {os.readlink(directory)}, which does not exist"
        raise CheckpointError(
            f"Cannot write the checkpoint directory {directory}: {why}. Nothing was "
            "changed; give a directory this process can write."
        ) from err
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise CheckpointError(
            f"Another run is training in {directory} ({LOCK_FILE} is held by {holder}); two "
            "runs writing one directory would replace each other's checkpoints. Nothing was "
            "changed. Wait for that run to end, or give this one another directory."
        ) from err
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()}\n")
    handle.flush()
    return handle


def describe_data(data: tf.data.Dataset) -> str:
    """What a resume must find again: the elements, the batches an epoch, the batch size,
    and the order: the seeds of its shuffles and random datasets (another seed replays
    other batches to the saved position).

    Example:
      >>> import tensorflow as tf
      >>> from tfpure.resume import describe_data
      >>> describe_data(tf.data.Dataset.range(10).batch(4))
      'elements TensorSpec(shape=(None,), dtype=tf.int64, name=None); 3 batches; batch size 4'
      >>> tf.random.set_seed(None)
      >>> describe_data(tf.data.Dataset.range(10).shuffle(10, seed=7).batch(4))[-23:]
      'size 4; shuffle seeds 7'
    """
    parts = [f"elements {data.element_spec}"]
    n = int(data.cardinality())
    if n >= 0:
        parts.append(f"{n} batches")
    graph, const = _dataset_graph(data)
    sizes = []
    for node in graph:
        inputs = dataset_op_inputs(node) if "BatchDataset" in node.op else None
        size = const(inputs["batch_size"]) if inputs and "batch_size" in inputs else None
        if size is not None:
            sizes.append(str(size))
    if sizes:
        parts.append("batch size " + ", ".join(sizes))
    seeds = []
    for node in graph:
        inputs = dataset_op_inputs(node) if node.op.startswith(_SEEDED) else None
        if inputs and "seed" in inputs and "seed2" in inputs:
            # An op seed alone is (graph default, op seed): named by the op seed.
            first, second = const(inputs["seed"]), const(inputs["seed2"])
            seeds.append(str(second) if first == _DEFAULT_GRAPH_SEED else f"{first}/{second}")
    if seeds:
        parts.append("shuffle seeds " + ", ".join(seeds))
    return "; ".join(parts)


# The dataset ops that draw an order from seeds, and the graph seed tf.data pairs with an
# op seed when no global seed is set (tensorflow/python/framework/random_seed.py).
_SEEDED = ("ShuffleDataset", "RandomDataset", "ShuffleAndRepeatDataset")
_DEFAULT_GRAPH_SEED = 87654321


class Run:
    """A checkpointed run's link to its `Checkpointer`: restore, save, SIGTERM.

    The loop (`tfpure.loop.Loop`) owns the run record; a `Run` restores the
    one saved last (``epoch`` windows finished, ``epoch_step`` steps into
    the current one, ``step`` steps in all) and saves positions the loop
    hands it.

    The data iterator is not saved: TensorFlow's iterator checkpoints do not
    restore reshuffle seeds exactly near the end of an epoch. The loop's
    `tfpure.stream.DataStream` rebuilds it by replay: it creates the past
    epochs' iterators (which draws their reshuffle seeds, as the interrupted
    run did) without reading them, then pulls the current epoch's finished
    batches in-graph without training on them. With one iterator over the
    repeated data (a step budget, or ``steps_per_epoch``) the replay pulls
    every batch of the run so far. This needs a pipeline that is a pure
    function of its seeds, which `_unreplayable` checks here, up front.
    """

    def __init__(
        self,
        ckpt: Checkpointer,
        state: Any,
        data: tf.data.Dataset,
        *,
        stream: bool,
        schedule: str,
        extra: Sequence[Any] = (),
        traced: Any = None,
    ):
        if not isinstance(data, tf.data.Dataset):
            raise TypeError(
                "Checkpointed training needs `data` as a tf.data.Dataset: a resumed run "
                f"replays it to the saved position. Got {type(data).__name__}."
            )
        if not stream and int(data.cardinality()) < 1:
            raise ValueError(
                "Checkpointed training needs the epoch length: the dataset's cardinality "
                "is unknown or infinite. Pass steps_per_epoch= (or steps=), or declare it "
                "with dataset.apply(tf.data.experimental.assert_cardinality(n))."
            )
        reason = _unreplayable(data)
        if reason:
            raise CheckpointError(
                "The training data cannot be checkpointed: a resumed run replays it to the "
                f"saved position, but {reason}, so the replay could differ from the run "
                "it resumes. Build it from seeded TensorFlow ops, or train without a "
                "Checkpointer."
            )
        self.ckpt, self.state, self.extra = ckpt, state, list(extra)
        _warn_of_unsaved_randomness(traced, saved_variables(state, self.extra))
        task = cluster_task(strategy_of(leaves(state)))
        # One writer per directory: the chief (or the only process) holds its lock file.
        self._lock = _lock(ckpt.directory) if task is None or task.chief else None
        try:
            spec = describe_data(data)
            self.path = ckpt.restore(state, extra=self.extra, schedule=schedule, data_spec=spec)
        except BaseException:
            self.close()
            raise
        if self.path is None:
            write_record(ckpt, Record())
            ckpt.record({})
        ckpt.schedule.assign(schedule)
        ckpt.data_spec.assign(spec)
        #: The restored record (a new run's at its start). A run that `ended` early
        #: has nothing left to do.
        self.record = read_record(ckpt)
        self.prior = ckpt.recorded_history()
        self._saved: tuple[Record, str] | None = None
        self.preempted = False
        self._previous_handler: Any = None
        # Across several processes a save is a collective: one worker saving on
        # its own SIGTERM would wait forever for the others. Multi-worker runs
        # keep SIGTERM's default and rely on periodic saves.
        single_process = task is None
        if single_process and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        del signum, frame
        self.preempted = True

    def save(self, record: Record, history: dict[str, list[float]], where: str) -> str:
        """Saves the state at `record` with `history`; after SIGTERM, raises `Preempted`.

        A record saved already (a SIGTERM right after a step save) is not
        written again: a listed checkpoint is never rewritten in place.
        """
        if self._saved is not None and self._saved[0] == record:
            path = self._saved[1]
        else:
            path = self._write(record, history)
        if self.preempted:
            print(
                f"tfpure: SIGTERM received; saved {path} {where}. Run the same command "
                "again to resume.",
                file=sys.stderr,
            )
            raise Preempted(path)
        return path

    def _write(self, record: Record, history: dict[str, list[float]]) -> str:
        write_record(self.ckpt, record)
        self.ckpt.record(history)
        path = self.ckpt.save(self.state, extra=self.extra, number=record.step)
        self._saved = (record, path)
        return path

    def close(self) -> None:
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            lock.close()  # releases the flock
        previous, self._previous_handler = getattr(self, "_previous_handler", None), None
        if previous is not None:
            preempted = getattr(self, "preempted", False) and previous == signal.SIG_DFL
            # A preempted process is ending with 143: another SIGTERM while it winds
            # down (the platform often sends one) ends it with 143 too, not -15.
            signal.signal(signal.SIGTERM, _exit_preempted if preempted else previous)
