"""`Checkpointer`: save everything that decides the future of a run, resume exactly.

A checkpoint holds every variable that decides what happens next: the model's
variables (BatchNorm statistics, and Dropout's `SeedGenerator` states, which
`tf.train.Checkpoint(model=...)` would miss), the optimizer's slots and
iteration count, training and evaluation metrics, `state.step`,
`state.skipped`, `state.rng`, and the loop's position (epoch or evaluation
window, step in it, steps in all, history so far). The data iterator itself is not saved: a resumed
`fit_loop` rebuilds it by replay (see `tfpure.resume`), which TensorFlow's iterator
checkpoints cannot match for reshuffled data.

Invariants:
  * a restore is all or nothing: every variable it would touch is copied
    first and put back if any part of the restore fails;
  * only complete checkpoints are listed (`tf.train.CheckpointManager`
    updates its index after the files are written), and a listed checkpoint
    whose files do not read back (truncated, corrupted) is skipped with a
    warning in favour of the previous one; a missing or damaged `checkpoint`
    state file (the index) is rebuilt from the `ckpt-N` files there, with a
    warning, never taken for an empty directory;
  * a checkpoint of another architecture is refused with an error naming the
    first variable that does not match, before anything is restored.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfpure.compat import checkpoint_value_key
from tfpure.distribute import cluster_task, strategy_of
from tfpure.record import Record
from tfpure.state import key_paths, leaves, variable_groups
from tfpure.types import check_count

__all__ = ["CheckpointError", "Checkpointer", "read_record", "saved_variables", "write_record"]


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not fit the state.

    Raised by `Checkpointer.restore` (and so by a checkpointed `fit_loop`)
    before any variable changes, and by `fit_loop` when the data cannot be
    replayed to a saved position.

    Example:
      >>> import keras, tempfile, tfpure as tp
      >>> small = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
      >>> wide = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
      >>> directory = tempfile.mkdtemp()
      >>> _ = tp.Checkpointer(directory).save(
      ...     tp.TrainState.create(model=small, optimizer=keras.optimizers.SGD()))
      >>> try:
      ...     tp.Checkpointer(directory).restore(
      ...         tp.TrainState.create(model=wide, optimizer=keras.optimizers.SGD()))
      ... except tp.CheckpointError as err:
      ...     print("refused:", "does not fit this state" in str(err))
      refused: True
    """


def _paths(states: Any) -> list[str]:
    """A name for each state of a structure: '' for one state, else its key path."""
    return ["".join(f"{key}/" for key in path) for path in key_paths(states)]


def _groups(states: Any, extra: Sequence[Any] = ()) -> dict[str, list[Any]]:
    """The variables of every state (and the loop's `extra`), grouped and ordered as saved."""
    groups: dict[str, list[Any]] = {}
    for path, state in zip(_paths(states), leaves(states), strict=True):
        for group, variables in variable_groups(state).items():
            groups[f"{path}{group}"] = variables
    if extra:
        groups["loop_logs"] = list(extra)
    return groups


def saved_variables(states: Any, extra: Sequence[Any] = ()) -> list[Any]:
    """Every variable a `Checkpointer` saves of `states` (and the loop's `extra`).

    Example:
      >>> import keras, tfpure as tp
      >>> from tfpure.checkpoint import saved_variables
      >>> model = keras.Sequential(
      ...     [keras.Input((2,)), keras.layers.Dropout(0.5), keras.layers.Dense(1)])
      >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())
      >>> any("seed_generator_state" in v.path for v in saved_variables(state))
      True
    """
    return [v for variables in _groups(states, extra).values() for v in variables]


def _name(variable: Any) -> str:
    return getattr(variable, "path", None) or variable.name


def _layout(groups: dict[str, list[Any]]) -> dict[str, list[list[Any]]]:
    return {
        group: [[_name(v), list(v.shape), tf.as_dtype(v.dtype).name] for v in variables]
        for group, variables in groups.items()
    }


def _mismatch(saved: dict[str, list[list[Any]]], mine: dict[str, list[list[Any]]]) -> str | None:
    """Names the first difference between two layouts (shapes and dtypes by position)."""
    if list(saved) != list(mine):
        return f"the checkpoint holds the groups {list(saved)}, the state {list(mine)}"
    for group in mine:
        a, b = saved[group], mine[group]
        if len(a) != len(b):
            return (
                f"the checkpoint holds {len(a)} {group} variables, the state {len(b)} "
                f"(first of the checkpoint: {[x[0] for x in a[:3]]}; of the state: "
                f"{[x[0] for x in b[:3]]})"
            )
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x[1:] != y[1:] and not (group == "loop_logs" and x[2] == y[2]):
                return (
                    f"{group} variable {i}: the checkpoint's {x[0]} has shape {tuple(x[1])} "
                    f"and dtype {x[2]}, the state's {y[0]} has shape {tuple(y[1])} and dtype {y[2]}"
                )
    return None


_OPTIMIZERS = "#optimizers"  # the layout's entry for the optimizers' classes and settings


def _settings(config: Any) -> Any:
    """An optimizer's config as JSON would read it back, without its (generated) names."""
    if isinstance(config, dict):
        return {k: _settings(v) for k, v in config.items() if k != "name"}
    if isinstance(config, list | tuple):
        return [_settings(v) for v in config]
    return json.loads(json.dumps(config, default=repr))


def _optimizers(states: Any) -> dict[str, dict[str, Any]]:
    """Each state's optimizer (by the state's path): its class and its settings."""
    out = {}
    for path, state in zip(_paths(states), leaves(states), strict=True):
        optimizer = state.optimizer
        if optimizer is None:
            continue
        name = type(optimizer).__name__
        inner = getattr(optimizer, "inner_optimizer", None)
        if inner is not None:  # LossScaleOptimizer(Adam)
            name = f"{name}({type(inner).__name__})"
        try:
            settings = _settings(optimizer.get_config())
        except Exception:  # an optimizer without a config: its class alone is checked
            settings = {}
        out[path] = {"class": name, "settings": settings}
    return out


def _changes(old: Any, new: Any, key: str = "") -> list[str]:
    """Each setting that differs: 'key: old -> new'."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            change
            for k in sorted(set(old) | set(new), key=str)
            for change in _changes(old.get(k), new.get(k), f"{key}.{k}" if key else str(k))
        ]
    return [] if old == new else [f"{key}: {old!r} -> {new!r}"]


def _learning_rates(states: Any) -> dict[str, tuple[Any, Any]]:
    """Each optimizer's learning-rate variable and its value now (a schedule has none)."""
    out = {}
    for path, state in zip(_paths(states), leaves(states), strict=True):
        rate = getattr(state.optimizer, "learning_rate", None)
        if isinstance(rate, keras.Variable | tf.Variable):
            out[path] = (rate, np.array(rate.numpy(), copy=True))
    return out


class Checkpointer:
    """Saves and restores a `TrainState`, and lets `fit_loop` resume a run exactly.

    Built on `tf.train.Checkpoint` and `tf.train.CheckpointManager`. Pass it
    as ``fit_loop(..., checkpoint=ckpt)``: on start, `fit_loop` restores the
    newest good checkpoint in `directory` and continues from that exact step,
    mid-epoch included, so that over the whole run each batch is trained
    exactly once; it saves every `save_every_steps` steps, every
    `save_every_epochs` epochs, at the end, and on SIGTERM (then raises
    `Preempted`). A run that already finished, or that a callback stopped
    early, does nothing when run again (`ended` says why it stopped). While a
    run trains, it holds the directory's lock file (``.tfpure.lock``): a
    second run on the same directory is refused.

    Attributes:
      ended: string `tf.Variable`, saved with the run: why it stopped before
        its schedule ended ("" if it did not).
      data_spec: string `tf.Variable`, saved with the run: its data's element
        shapes, batches an epoch and batch size (see
        `tfpure.resume.describe_data`).

    Args:
      directory: where checkpoints live (created if needed).
      max_to_keep: newest checkpoints kept; older ones are deleted.
      save_every_steps: save after every this many training steps (None: not
        by steps). In `fit_loop` this is one action among the others: with
        ``steps_per_call > 1`` calls are cut short to land on these steps.
      save_every_epochs: save at the end of every this many epochs, or
        evaluation windows of a step budget (None: not by epochs). A step
        that is both a step save and a window's end is saved once, after
        the window's validation.

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
        check_count("max_to_keep", max_to_keep)
        check_count("save_every_steps", save_every_steps, optional=True)
        check_count("save_every_epochs", save_every_epochs, optional=True)
        self.directory = os.fspath(directory)
        self.max_to_keep = max_to_keep
        self.save_every_steps = save_every_steps
        self.save_every_epochs = save_every_epochs
        # The loop's position and record, saved with the state.
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.epoch_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch_step")
        self.loop_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="loop_step")
        self.history = tf.Variable("{}", trainable=False, name="history")
        # How the run splits into windows ("epochs of 8 steps", ...): a resume must match.
        self.schedule = tf.Variable("", trainable=False, name="schedule")
        # Why the run ended before its schedule did ("" while it has not): run again, it stays.
        self.ended = tf.Variable("", trainable=False, name="ended")
        # What the run's data looks like (elements, batches, batch size): a resume must match.
        self.data_spec = tf.Variable("", trainable=False, name="data_spec")
        self._layout = tf.Variable("", trainable=False, name="layout")
        # The optimizers' classes and settings the run started with (or last changed to).
        self._started: dict[str, dict[str, Any]] | None = None
        self._managed: tuple[tuple[int, ...], tf.train.CheckpointManager] | None = None

    # -- the checkpoint object ----------------------------------------------------

    def _manager(self, state: Any, extra: Sequence[Any]) -> tf.train.CheckpointManager:
        key = tuple(id(v) for v in [*leaves(state), *extra])
        if self._managed is None or self._managed[0] != key:
            groups = _groups(state, extra)
            checkpoint = tf.train.Checkpoint(
                **{name.replace("/", "__"): variables for name, variables in groups.items()},
                loop=[
                    self.epoch,
                    self.epoch_step,
                    self.loop_step,
                    self.history,
                    self.schedule,
                    self.ended,
                    self.data_spec,
                ],
                layout=self._layout,
            )
            task = cluster_task(strategy_of(leaves(state)))
            directory, keep = self.directory, self.max_to_keep
            if task is not None and not task.chief:
                # Every worker must take part in a save (reading its metrics is
                # a collective op), but only the chief's files are kept.
                directory, keep = os.path.join(self.directory, f".{task.name}"), 1
            manager = tf.train.CheckpointManager(
                checkpoint, directory, max_to_keep=keep, checkpoint_name="ckpt"
            )
            self._managed = (key, manager)
        return self._managed[1]

    def checkpoints(self) -> list[str]:
        """The complete checkpoints in `directory`, newest first.

        Example:
          >>> import tempfile, tfpure as tp
          >>> tp.Checkpointer(tempfile.mkdtemp()).checkpoints()
          []
        """
        return self._listed()[0]

    def _listed(self) -> tuple[list[str], bool]:
        """The checkpoints, newest first, and whether they were found by their files because
        the `checkpoint` state file is missing, unreadable (garbled, truncated: ValueError,
        ParseError, ...) or names no checkpoint."""
        try:
            found = tf.train.get_checkpoint_state(self.directory)
        except Exception:
            found = None
        if found is None or not found.model_checkpoint_path:
            files = self._files()
            return files, bool(files)
        # get_checkpoint_state has already joined relative paths to `directory`.
        paths = list(found.all_model_checkpoint_paths) or [found.model_checkpoint_path]
        return list(reversed(paths)), False

    def _files(self) -> list[str]:
        """The checkpoints whose files are in `directory` (newest first), whatever the index."""
        return [os.path.join(self.directory, f"ckpt-{n}") for n in _numbers(self.directory)]

    def _write_index(self, newest: str, paths: list[str]) -> None:
        """Writes the `checkpoint` state file (paths relative, oldest first), with the files'
        times, so a `CheckpointManager` keeps managing (and deleting) them."""
        times = [os.path.getmtime(p + ".index") for p in paths]
        tf.compat.v1.train.update_checkpoint_state(
            self.directory,
            os.path.basename(newest),
            all_model_checkpoint_paths=[os.path.basename(p) for p in paths],
            all_model_checkpoint_timestamps=times,
            last_preserved_timestamp=min(times) - 1,
        )

    # -- save ---------------------------------------------------------------------

    def save(self, state: Any, *, extra: Sequence[Any] = (), number: int | None = None) -> str:
        """Writes a checkpoint of `state` (and the loop's position); returns its path.

        `state` is a `TrainState` or a dict / tuple / list of them; `extra`
        holds further variables saved with it (`fit_loop` passes a
        `make_step` body's running log means). The checkpoint is numbered
        `number` (`fit_loop` passes its count of steps, skipped batches
        included), by default the largest `state.step` of its states; a
        number already in `directory` is never written again: the save then
        takes the one after the newest there. So the numbers of a
        directory's checkpoints are distinct and increase with each save.

        Example:
          >>> import keras, tempfile, tfpure as tp
          >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
          >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())
          >>> ckpt = tp.Checkpointer(tempfile.mkdtemp())
          >>> [os.path.basename(ckpt.save(state)) for _ in range(2)]
          ['ckpt-0', 'ckpt-1']
        """
        current = _optimizers(state)
        classes = {k: v["class"] for k, v in current.items()}
        if self._started is None or classes != {k: v["class"] for k, v in self._started.items()}:
            self._started = current
        layout = {**_layout(_groups(state, extra)), _OPTIMIZERS: self._started}
        self._layout.assign(json.dumps(layout))
        manager = self._manager(state, extra)
        if number is None:
            number = max(int(s.step.numpy()) for s in leaves(state))
        taken = _numbers(manager.directory, complete=False)
        if taken and number <= taken[0]:
            number = taken[0] + 1
        path = manager.save(checkpoint_number=number)
        if manager.directory != self.directory:  # a worker's throwaway copy
            shutil.rmtree(manager.directory, ignore_errors=True)
            return os.path.join(self.directory, os.path.basename(path))
        return path

    # -- restore ------------------------------------------------------------------

    def _check(self, path: str, state: Any, extra: Sequence[Any], mine: dict[str, Any]) -> None:
        """Raises `tf.errors.OpError` if the files do not read back, `CheckpointError`
        if they hold another architecture or optimizer class (`mine`: `_optimizers(state)`)."""
        reader = tf.train.load_checkpoint(path)
        for key in reader.get_variable_to_dtype_map():
            reader.get_tensor(key)
        saved = json.loads(reader.get_tensor(checkpoint_value_key("layout")))
        optimizers = saved.pop(_OPTIMIZERS, {})  # (tfpure 0.1's checkpoints hold none)
        other = [
            f"its {where}optimizer is {optimizers[where]['class']}, the state's "
            f"{mine[where]['class']} (another optimizer would misread its slots)"
            for where in sorted(set(optimizers) & set(mine))
            if optimizers[where]["class"] != mine[where]["class"]
        ]
        problem = _mismatch(saved, _layout(_groups(state, extra))) or next(iter(other), None)
        if problem:
            raise CheckpointError(
                f"Checkpoint {path} does not fit this state: {problem}. It was written "
                "for another model, optimizer or set of metrics."
            )

    def restore(
        self,
        state: Any,
        *,
        extra: Sequence[Any] = (),
        schedule: str | None = None,
        data_spec: str | None = None,
    ) -> str | None:
        """Restores the newest good checkpoint into `state` (and the loop's position).

        `state` and `extra` as for `save`. `schedule` (given by `fit_loop`)
        describes how the resuming run splits into windows; a checkpoint
        written by a run of another schedule is refused; so is one whose data
        (`data_spec`: element shapes, batches, batch size) differs, since its
        saved position counts that data's batches.

        Returns:
          The path restored, or None if `directory` holds no checkpoint.

        Raises:
          CheckpointError: checkpoints exist but none reads back, or the newest
            readable one was written for another architecture (or, with
            `schedule`, by a run of another schedule). Nothing changed.

        Example:
          >>> import keras, tempfile, tfpure as tp
          >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
          >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())
          >>> print(tp.Checkpointer(tempfile.mkdtemp()).restore(state))
          None
        """
        mine, rates = _optimizers(state), _learning_rates(state)
        paths, lost = self._listed()
        if not paths:
            self._started = mine
            return None
        if lost:
            warnings.warn(
                f"The checkpoint state file in {self.directory} is missing or damaged; "
                f"restoring from the checkpoint files there (newest first: {paths[0]}).",
                RuntimeWarning,
                stacklevel=2,
            )
            # An index of the files found, so the manager can start (rewritten below).
            self._write_index(paths[0], paths[::-1])
            self._managed = None
        failures = []
        for path in paths:
            failure, put_back = self._restore_from(path, state, extra, mine)
            if failure is not None:
                failures.append(f"{path}: {failure}")
                continue
            refusal = self._refusal(path, schedule, data_spec)
            if refusal is not None:
                put_back()
                raise CheckpointError(refusal)
            self._settle_optimizers(path, mine, rates)
            if lost:  # The index as it was: up to the one restored, `max_to_keep` of them.
                kept = paths[paths.index(path) :][: self.max_to_keep][::-1]
                self._write_index(path, kept)
                self._managed = None  # The next save's manager reads this index.
            return path
        raise CheckpointError(
            f"No checkpoint in {self.directory} can be restored; nothing was changed:\n  "
            + "\n  ".join(failures)
        )

    def _restore_from(
        self, path: str, state: Any, extra: Sequence[Any], mine: dict[str, Any]
    ) -> tuple[str | None, Callable[[], None]]:
        """Restores `path` all or nothing: (why it failed, with a warning; or None, and a
        function putting back what it changed).

        Raises `CheckpointError` (nothing changed) if it holds another architecture.
        """
        try:
            self._check(path, state, extra, mine)
        except CheckpointError:
            raise
        except Exception as err:  # the reader raises OpError, IndexError, ...
            failure = f"{type(err).__name__}: {str(err).splitlines()[0]}"
            warnings.warn(
                f"Checkpoint {path} does not read back ({path}: {failure}); trying the "
                "previous one.",
                RuntimeWarning,
                stacklevel=3,
            )
            return failure, _nothing
        variables = saved_variables(state, extra)
        variables += [self.epoch, self.epoch_step, self.loop_step, self.history]
        variables += [self.schedule, self.ended, self.data_spec]
        backup = [np.array(v.numpy(), copy=True) for v in variables]

        def put_back() -> None:
            for v, value in zip(variables, backup, strict=True):
                v.assign(value)

        try:
            self._manager(state, extra).checkpoint.restore(path).assert_existing_objects_matched()
        except (tf.errors.OpError, AssertionError, ValueError) as err:
            put_back()
            failure = f"{type(err).__name__}: {str(err).splitlines()[0]}"
            warnings.warn(
                f"Checkpoint {path} failed to restore ({path}: {failure}); nothing was "
                "changed; trying the previous one.",
                RuntimeWarning,
                stacklevel=3,
            )
            return failure, _nothing
        return None, put_back

    def _settle_optimizers(
        self, path: str, mine: dict[str, Any], rates: dict[str, tuple[Any, Any]]
    ) -> None:
        """After a restore: the resuming optimizers' settings win over the run's (a learning
        rate the run's callbacks changed stays, unless the resuming run sets another)."""
        saved = json.loads(self._layout.numpy().decode()).get(_OPTIMIZERS)
        if saved is None:
            self._started = mine
            return
        changes = {
            where: _changes(saved[where]["settings"], mine[where]["settings"])
            for where in mine
            if where in saved
        }
        lines = [f"{where}{change}" for where, found in changes.items() for change in found]
        if not lines:
            self._started = saved
            return
        for where, found in changes.items():
            if where in rates and any(c.split(":")[0].endswith("learning_rate") for c in found):
                variable, value = rates[where]
                variable.assign(value)
        self._started = mine
        warnings.warn(
            f"Checkpoint {path} was written by a run whose optimizer had other settings; "
            f"this run's win (old -> new): {'; '.join(lines)}.",
            RuntimeWarning,
            stacklevel=3,
        )

    def _refusal(self, path: str, schedule: str | None, data_spec: str | None) -> str | None:
        """Why the just-restored run at `path` cannot go on as this one, or None."""
        saved = self.schedule.numpy().decode()
        if schedule is not None and saved and saved != schedule:
            return (
                f"Checkpoint {path} was written by a run in {saved}; this run asks for "
                f"{schedule}, so its saved position means another step. Nothing was "
                "changed. Resume with the same schedule (epoch length, or a budget's "
                "eval_every), or train in another directory."
            )
        saved = self.data_spec.numpy().decode()
        if data_spec is not None and "; shuffle seeds " not in saved:
            data_spec = data_spec.split("; shuffle seeds ")[0]  # saved before seeds were
        if data_spec is not None and saved and saved != data_spec:
            return (
                f"Checkpoint {path} was written by a run over other data ({saved}); this "
                f"run's data: {data_spec}. Its saved position counts batches of that data "
                "in that order, so the resume would not be exact. Nothing was changed. "
                "Resume with the same data (batch size, examples, element shapes, shuffle "
                "seeds), or train in another directory."
            )
        return None

    # -- the loop's record ----------------------------------------------------------

    def recorded_history(self) -> dict[str, list[float]]:
        """The history of the epochs completed so far in this run (as restored).

        Example:
          >>> import tempfile, tfpure as tp
          >>> tp.Checkpointer(tempfile.mkdtemp()).recorded_history()
          {}
        """
        return {k: v for k, v in self._recorded().items() if not k.startswith("#")}

    def _recorded(self) -> dict[str, Any]:
        return json.loads(self.history.numpy().decode())

    def record(self, history: dict[str, Sequence[float]]) -> None:
        """Sets the history the next save records (`fit_loop` calls it after each epoch).

        Example:
          >>> import tempfile, tfpure as tp
          >>> ckpt = tp.Checkpointer(tempfile.mkdtemp())
          >>> ckpt.record({"loss": [0.5, 0.25]})
          >>> ckpt.recorded_history()
          {'loss': [0.5, 0.25]}
        """
        kept = {k: v for k, v in self._recorded().items() if k.startswith("#")}  # the record's
        kept.update({k: [float(x) for x in v] for k, v in history.items()})
        self.history.assign(json.dumps(kept))

    def __repr__(self) -> str:
        return (
            f"Checkpointer({self.directory!r}, max_to_keep={self.max_to_keep}, "
            f"save_every_steps={self.save_every_steps}, "
            f"save_every_epochs={self.save_every_epochs})"
        )


def _numbers(directory: str, *, complete: bool = True) -> list[int]:
    """The numbers of the checkpoints in `directory`, largest first: those with an index
    file, or (not `complete`) with any file (a save cut short leaves data shards)."""
    numbered = set()
    pattern = r"ckpt-(\d+)\.index" if complete else r"ckpt-(\d+)\.(index|data-\d+-of-\d+)"
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            match = re.fullmatch(pattern, name)
            if match:
                numbered.add(int(match.group(1)))
    return sorted(numbered, reverse=True)


def _nothing() -> None:
    """Nothing to put back."""


_SKIPPED_BEFORE = "#skipped before the window"


def read_record(ckpt: Checkpointer) -> Record:
    """The run record `ckpt` holds (as restored, or as `write_record` set it).

    Example:
      >>> import tempfile, tfpure as tp
      >>> from tfpure.checkpoint import read_record, write_record
      >>> from tfpure.record import Record
      >>> ckpt = tp.Checkpointer(tempfile.mkdtemp())
      >>> write_record(ckpt, Record(window=2, done=3, step=19))
      >>> read_record(ckpt)
      Record(window=2, done=3, step=19, ended='')
    """
    window, done, step = (int(v.numpy()) for v in (ckpt.epoch, ckpt.epoch_step, ckpt.loop_step))
    skipped = ckpt._recorded().get(_SKIPPED_BEFORE)
    return Record(window, done, step, ckpt.ended.numpy().decode(), skipped_before=skipped)


def write_record(ckpt: Checkpointer, record: Record) -> None:
    """Sets the run record the next save of `ckpt` writes."""
    for variable, value in zip(
        (ckpt.epoch, ckpt.epoch_step, ckpt.loop_step),
        (record.window, record.done, record.step),
        strict=True,
    ):
        variable.assign(value)
    ckpt.ended.assign(record.ended)
    # (In the history's JSON: a variable more would refuse the checkpoints written before.)
    recorded = ckpt._recorded()
    recorded[_SKIPPED_BEFORE] = record.skipped_before
    ckpt.history.assign(json.dumps(recorded))


_CONFIGURATION = "#configuration"
_HISTORY = "loop/3"  # `Checkpointer.history`, the fourth of the checkpoint's `loop` list


def write_configuration(ckpt: Checkpointer, spec: Any) -> None:
    """Sets the step configuration (``spec.jit_compile``, ``spec.steps_per_call``) the
    next save of `ckpt` records, for a resumed ``"auto"`` step (`recorded_configuration`)."""
    recorded = ckpt._recorded()
    recorded[_CONFIGURATION] = [bool(spec.jit_compile), int(spec.steps_per_call)]
    ckpt.history.assign(json.dumps(recorded))


def recorded_configuration(ckpt: Checkpointer) -> tuple[bool, int] | None:
    """The step configuration ``(jit_compile, steps_per_call)`` the newest checkpoint in
    `ckpt`'s directory recorded (`write_configuration`), read without restoring anything;
    None if there is no checkpoint or it recorded none.

    Example:
      >>> import keras, tempfile, tfpure as tp
      >>> from tfpure.checkpoint import recorded_configuration, write_configuration
      >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
      >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())
      >>> ckpt = tp.Checkpointer(tempfile.mkdtemp())
      >>> print(recorded_configuration(ckpt))
      None
      >>> write_configuration(ckpt, tp.make_train_step("mse", steps_per_call=16).spec)
      >>> _ = ckpt.save(state)
      >>> recorded_configuration(tp.Checkpointer(ckpt.directory))
      (False, 16)
    """
    for path in ckpt.checkpoints():
        try:
            reader = tf.train.load_checkpoint(path)
            recorded = json.loads(reader.get_tensor(checkpoint_value_key(_HISTORY)))
        except (tf.errors.OpError, ValueError):
            continue  # a damaged checkpoint: restore skips it too
        found = recorded.get(_CONFIGURATION)
        return None if found is None else (bool(found[0]), int(found[1]))
    return None
