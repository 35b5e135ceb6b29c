"""The step engine: the graph functions a step runs for one structure of states.

Every step, built-in or user-written, is a *body* (see `tfpure.builtin` and
`tfpure.custom`) that runs on one replica. The first time a `Step` meets a
state (or a structure of states) it builds an `Engine` here, holding the
`tf.function`s that run that body:

  * ``on_batch(batch) -> logs``: a call on one batch;
  * ``on_iterator(iterator, k) -> (steps_run, logs)``: up to `k` steps pulled
    from a `tf.data` iterator inside the graph (a `tf.while_loop`);
  * `epoch_runner`: a cheaper caller of ``on_iterator`` bound to one iterator.

One step, inside either function, is ``save → body (on every replica) →
merge → keep or put back``: the guard's `Rollback` saves the variables the
body may move before it knows whether the step is good; the body's `merge`
gives the verdict in cross-replica context; a failed step puts them back
(and, with ``nonfinite="skip"``, is counted). The body alone runs under XLA
with ``jit_compile=True``.

Invariant of every guarded step: when a check fails, or the graph fails at
run time in the forward or backward pass (a label out of range, say), no
variable the guard covers changes. (A built-in step writes nothing before
both passes ran whole; a user-written body's every variable has a shadow.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import tensorflow as tf

from tfpure.batch import unpack
from tfpure.builtin import Logs
from tfpure.compat import flat_caller, keras_random_algorithm, model_input_structure
from tfpure.distribute import cluster_task, replica_share
from tfpure.guard import MARK, Rollback

if TYPE_CHECKING:
    from tfpure.spec import StepSpec

__all__ = ["Engine"]


class Engine:
    """The graph functions of one step body.

    Holds the body (which holds the states' fields, never the states
    themselves, so that a step's per-state cache lets states die).
    """

    def __init__(
        self,
        spec: StepSpec,
        body: Any,
        count_trace: Callable[[], None],
        examples: tf.Variable,
    ):
        self.spec = spec
        self.body = body
        self.count_trace = count_trace
        self.strategy = body.strategy
        # Several processes: the loops hand over per-replica batches (see _run_one).
        self.sharded = cluster_task(self.strategy) is not None
        self.guarded = body.train and spec.nonfinite is not None
        # Examples run through the step (kept or skipped): the loops' throughput.
        self.examples = examples
        # Built by `Step.engine` under the strategy's scope, like the body's variables.
        self.rollback = (
            Rollback(body.rollback_variables, getattr(body, "held_variables", ()))
            if self.guarded
            else None
        )
        if spec.jit_compile and self.strategy is not None and not body.merge_free:
            raise ValueError(
                f"jit_compile=True is not supported under {type(self.strategy).__name__}: its "
                "gradient all-reduce cannot run inside XLA. Use jit_compile=False there."
            )
        one = body.one
        if spec.jit_compile:
            # Keras' random ops (Dropout's masks) drawn with threefry: XLA on CPU compiles
            # the default algorithm to a draw several times slower than the plain graph's
            # (`benchmarks/xla_random.py`).
            one = tf.function(_threefry(one), jit_compile=True, reduce_retracing=True)
        elif self.strategy is None:
            # A function of its own, as Keras' `one_step_on_data`: the step's graph is
            # then optimised alike whether one call runs it once or in a loop, so
            # fused calls give bit for bit the variables of single ones. Its
            # signature follows the caller's (exact: the feature checks see real sizes).
            # (Not under a strategy: a nested function cannot hold the body's
            # cross-replica synchronisation.)
            one = tf.function(one, autograph=False)
        self.one = one
        # Exact signatures: `Step.__call__` traces a batch-size-free signature
        # first, widened where later batches' sizes differ (`widen`), which
        # every later batch dispatches to. (Relaxing shapes by reduce_retracing
        # would also relax feature sizes past the checks.)
        self.on_batch = tf.function(self._on_batch, autograph=False)
        self.signatures: list[Any] = []  # the widest batch signature of each structure
        # Per flat model input, which dimensions its declaration fixes (None: no
        # declared inputs: a subclassed model, or a user-written body).
        model = getattr(body, "model", None)
        inputs = model_input_structure(model) if model is not None else None
        self.declared = (
            None
            if inputs is None
            else [
                tuple(d is not None for d in tf.TensorShape(i.shape).as_list())
                if tf.TensorShape(i.shape).rank is not None
                else ()
                for i in tf.nest.flatten(inputs)
            ]
        )
        self.on_iterator = tf.function(self._on_iterator, reduce_retracing=True, autograph=False)

    def widen(self, signature: Any) -> Any:
        """The signature to trace for a batch of `signature`, or None if one covers it.

        A batch of a structure seen before widens that structure's signature:
        each dimension where the two differ becomes free (None), as
        ``reduce_retracing`` would, but never a dimension the model's declared
        inputs fix (`_pinned`).
        """
        new = tf.nest.flatten(signature)
        for index, known in enumerate(self.signatures):
            if not _same_kind(known, signature):
                continue
            old = tf.nest.flatten(known)
            if _covers(old, new):
                return None
            pinned = self._pinned(signature)
            widened = [_widened(o, n, fix) for o, n, fix in zip(old, new, pinned, strict=True)]
            if widened == old:
                return signature  # only pinned sizes differ: traced exactly, and checked
            self.signatures[index] = tf.nest.pack_sequence_as(known, widened)
            return self.signatures[index]
        self.signatures.append(signature)
        return signature

    def _pinned(self, signature: Any) -> list[tuple[bool, ...]]:
        """Per flat leaf of a batch signature, which dimensions the model fixes.

        Only the features of a model with declared inputs are pinned; targets,
        weights and other features are free (their layers and losses check them).
        """
        pinned: list[tuple[bool, ...]] = [()] * len(tf.nest.flatten(signature))
        if self.declared is not None and len(self.declared) == len(
            tf.nest.flatten(unpack(signature)[0])
        ):
            pinned[: len(self.declared)] = self.declared
        return pinned

    # -- one step -----------------------------------------------------------------

    def _run_one(self, batch: Any) -> tf.Tensor:
        """One step, on the one device or on every replica; returns whether it did not fail.

        The body's `merge` says whether to keep the step and whether it failed:
        a step a `LossScaleOptimizer` skipped is put back, yet no failure.
        """
        saves, held = self.rollback.save() if self.rollback else ([], [])
        with tf.control_dependencies(saves + held):
            keep, ok = self.body.merge(self._dispatch(batch))
        with tf.control_dependencies([keep, ok]):
            counted = self.examples.assign_add(self._examples_in(batch))
        if self.rollback is None:
            with tf.control_dependencies([counted]):
                return tf.identity(ok)

        def put_back() -> tf.Tensor:
            with tf.control_dependencies(self.rollback.restore(held)):
                skips = self.body.on_skip() if self.spec.nonfinite == "skip" else []
            with tf.control_dependencies(skips):
                return tf.constant(False)

        kept = tf.cond(keep, lambda: tf.constant(True), put_back)
        with tf.control_dependencies([kept, counted]):
            disarm = self.rollback.disarm()
        with tf.control_dependencies([disarm]):
            return tf.identity(ok)

    def _examples_in(self, batch: Any) -> tf.Tensor:
        """The number of examples in `batch`: the leading size of its first leaf."""
        leaves = tf.nest.flatten(batch)
        if not leaves:
            return tf.constant(1, tf.int64)
        parts = self.strategy.experimental_local_results(leaves[0]) if self.sharded else leaves[:1]
        sizes = []
        for part in parts:
            if isinstance(part, tf.RaggedTensor):
                sizes.append(part.nrows(out_type=tf.int64))
            elif isinstance(part, tf.SparseTensor):
                sizes.append(part.dense_shape[0])
            elif getattr(part, "shape", None) is None or tf.TensorShape(part.shape).rank == 0:
                sizes.append(tf.constant(1, tf.int64))  # a scalar (or no array at all)
            else:
                sizes.append(tf.shape(part, out_type=tf.int64)[0])
        return tf.add_n(sizes)

    def _dispatch(self, batch: Any) -> Any:
        """Runs the body on the one device, or on every replica of the strategy.

        A multi-worker strategy feeds per-replica batches (its iterators are
        distributed, to shard the data between workers). In one process the
        global batch is split inside the graph instead (`replica_share`): the
        data then flows through an ordinary iterator, which costs less per
        epoch than a distributed one.
        """
        if self.strategy is None:
            return self.one(batch)
        fn = self.one if self.sharded else lambda b: self.one(replica_share(b))
        return self.strategy.run(fn, args=(batch,))

    # -- graph entry points ---------------------------------------------------------

    def _assert_kept(self, ok: tf.Tensor) -> list:
        """In "raise" mode, fails the call if a step was not kept."""
        if self.guarded and self.spec.nonfinite == "raise":
            return [tf.debugging.Assert(ok, [MARK])]
        return []

    def _on_batch(self, batch: Any) -> Logs:
        self.count_trace()
        ok = self._run_one(batch)
        with tf.control_dependencies(self._assert_kept(ok)):
            return self.body.logs()

    def _on_iterator(self, iterator: Any, k: tf.Tensor) -> tuple[tf.Tensor, Logs]:
        self.count_trace()
        stop_on_failure = self.guarded and self.spec.nonfinite == "raise"

        def cond(i: tf.Tensor, ok: tf.Tensor, more: tf.Tensor) -> tf.Tensor:
            keep = tf.logical_and(i < k, more)
            return tf.logical_and(keep, ok) if stop_on_failure else keep

        def body(i: tf.Tensor, ok: tf.Tensor, more: tf.Tensor) -> tuple:
            optional = iterator.get_next_as_optional()
            return tf.cond(
                optional.has_value(),
                lambda: (i + 1, self._run_one(optional.get_value()), tf.constant(True)),
                lambda: (i, ok, tf.constant(False)),
            )

        start = (tf.constant(0), tf.constant(True), tf.constant(True))
        if self.spec.steps_per_call == 1:  # Straight-line: no loop machinery.
            i, ok, _ = body(*start)
        else:
            i, ok, _ = tf.while_loop(cond, body, start)
        with tf.control_dependencies(self._assert_kept(ok)):
            return tf.identity(i), self.body.logs()

    def epoch_runner(self, iterator: Any) -> Callable[[tf.Tensor], tuple[tf.Tensor, Logs]]:
        """A caller of the iterator function bound to one iterator (one epoch).

        A `tf.function` call spends most of its time on dispatch when the
        step is small: it hashes the iterator's type (its whole element
        spec) on every call. The iterator and its signature are fixed for an
        epoch, so the runner resolves the concrete function once and then
        feeds it flat tensors (`tfpure.compat.flat_caller`). Under
        `run_functions_eagerly`, or inside another graph, it falls back to
        the ordinary call.
        """
        if tf.config.functions_run_eagerly() or not tf.executing_eagerly():
            return lambda limit: self.on_iterator(iterator, limit)
        concrete = self.on_iterator.get_concrete_function(iterator, tf.TensorSpec([], tf.int32))
        return flat_caller(concrete, iterator)

    # -- recovery -------------------------------------------------------------------

    def recover(self) -> None:
        """After a failed call: puts back what the failed step moved."""
        if self.rollback is not None:
            self.rollback.recover()

    def explain_failure(self) -> str:
        return self.body.explain_failure()


def _threefry(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn`, traced with Keras' random ops drawing with the threefry algorithm."""

    @functools.wraps(fn)
    def traced(*args: Any) -> Any:
        if tf.executing_eagerly():  # run_functions_eagerly: no XLA, and no threefry kernel
            return fn(*args)
        with keras_random_algorithm("threefry"):
            return fn(*args)

    return traced


def _same_kind(a: Any, b: Any) -> bool:
    """Same structure, and leaf by leaf the same dtype and rank (or the same spec)."""
    try:
        tf.nest.assert_same_structure(a, b)
    except (TypeError, ValueError):
        return False
    return all(
        _kind(x) == _kind(y) for x, y in zip(tf.nest.flatten(a), tf.nest.flatten(b), strict=True)
    )


def _widened(old: Any, new: Any, pinned: tuple[bool, ...]) -> Any:
    """`old` with each dimension where `new` differs left free, unless `pinned`."""
    if not isinstance(old, tf.TensorSpec):
        return old
    dims = [
        a if a == b or (d < len(pinned) and pinned[d]) else None
        for d, (a, b) in enumerate(zip(old.shape.as_list(), new.shape.as_list(), strict=True))
    ]
    return tf.TensorSpec(dims, old.dtype)


def _kind(leaf: Any) -> Any:
    if isinstance(leaf, tf.TensorSpec):
        return ("tensor", leaf.dtype, leaf.shape.rank)
    if isinstance(leaf, tf.__internal__.CompositeTensor):  # ragged, sparse: their exact spec
        return ("composite", tf.type_spec_from_value(leaf))
    return ("value", type(leaf), repr(leaf))


def _covers(general: list[Any], specific: list[Any]) -> bool:
    return all(
        g.is_compatible_with(s) if isinstance(g, tf.TensorSpec) else True
        for g, s in zip(general, specific, strict=True)
    )
