"""The step engine: the graph functions a step runs for one structure of states.

Every step, built-in or user-written, is a *body* (see `tfpure.builtin` and
`tfpure.custom`) that runs on one replica. The first time a `Step` meets a
state (or a structure of states) it builds an `Engine` here, holding the
`tf.function`s that run that body:

  * ``on_batch(batch) -> logs``: a call on one batch;
  * ``on_iterator(iterator, k) -> (steps_run, logs)``: up to `k` steps pulled
    from a `tf.data` iterator inside the graph (`batch.loop_over_batches`);
  * ``on_next(iterator, k)``: at one step a call on one device, that step,
    straight-line (and a guarded engine's `Window`, whose one-step calls a
    loop judges together while nothing looks at the state between them);
  * `epoch_runner`: a cheaper caller of these bound to one iterator.

One step, inside either function, is ``save → body (on every replica) →
merge → keep or put back``: the guard's `Rollback` saves the variables the
body may move before it knows whether the step is good; the body's `merge`
gives the verdict in cross-replica context; a failed step puts them back
(and, with ``nonfinite="skip"``, is counted). The body alone runs under XLA
with ``jit_compile=True``.

A guarded call of several steps on one device pulled from an iterator
judges them at once instead (`Fused`): the call pulls its batches first and
copies the values from before it; its steps run with nothing put back; if a
step is not kept, or one fails at run time, the call puts everything back and
its steps run again one at a time as above (`replay`, a function of its own
that only a failed call traces). Its results equal the per-step path's bit
for bit (the same body, on the same batches, from the same seeds); a failure
costs the call twice. A `Window` does the same across one-step graph calls,
holding the values from its start as its `open` read them.

Invariant of every guarded step: when a check fails, or the graph fails at
run time in the forward pass (a label out of range, say), no variable the
guard covers changes. (A built-in step writes nothing before its forward pass
ran whole; a user-written body's every variable has a shadow.) A built-in
step's updates do not wait for its whole backward pass: an error raised by a
backward op alone (an assertion in a user's custom gradient) may leave part
of the update written, as in the unguarded step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

import keras
import tensorflow as tf

from tfpure.arrays import array_groups
from tfpure.batch import loop_over_batches
from tfpure.compat import branch, flat_caller, keras_random_algorithm
from tfpure.distribute import cluster_task, replica_share
from tfpure.guard import MARK, Rollback, components, variable
from tfpure.signature import Signatures
from tfpure.types import Logs

if TYPE_CHECKING:
    from tfpure.spec import StepSpec

__all__ = ["Body", "Engine"]

PutBack = Literal["cond", "inline", "window"]


class Body(Protocol):
    """What the engine asks of a step body: a built-in one (`tfpure.builtin`) or a
    user-written one (`tfpure.custom`). A body runs on one replica."""

    #: Whether the body trains (only a training body is guarded).
    train: bool
    strategy: tf.distribute.Strategy | None
    #: Whether the strategy all-reduces gradients without `merge_call` (XLA needs it).
    merge_free: bool
    #: The model whose declared inputs pin batch signatures (None: a user-written body).
    model: keras.Model | None
    #: What a step's forward pass may move: shadowed before each step.
    rollback_variables: Sequence[Any]
    #: What else a step may write: its values held before each step.
    held_variables: Sequence[Any]
    #: What a step writes beyond the guard's cover (a `Fused` call puts it back too).
    also_written: Sequence[Any]

    def one(self, batch: Any, judge: bool = True, ordered: bool = True) -> Any:
        """The step on one replica's batch (traced; inside XLA under ``jit_compile``).
        Not `judge`: a step of a call judged at its end, which checks only that its batch
        held examples (a built-in body) and a loss scale's overflow; the call's `verdict`
        judges its loss or logs (through their sums) and the variables. Not `ordered`:
        its updates need not wait for its forward pass to run whole (a step of a
        `Window` or a `Fused` call, which hold the values from before their steps of
        every variable: a run-time error puts them back)."""

    def verdict(self) -> tf.Tensor:
        """Whether every variable a step checks, and the sums of its loss or logs, are
        finite: a call's verdict at its end."""

    def merge(self, out: Any, record: bool = True) -> tuple[tf.Tensor, tf.Tensor]:
        """(keep the step, no failure), in cross-replica context; `record`: note a failure."""

    def on_skip(self) -> list[Any]:
        """The ops that count a skipped step."""

    def logs(self) -> Logs:
        """The running figures the step reports."""

    def explain_failure(self) -> str:
        """What the last failed step met, for `NonFiniteError`."""

    def label_checks(self, batch: Any) -> list[Any]:
        """Checks XLA cannot make itself (a label out of range gives a NaN there, no
        error), run before an XLA call on `batch` (one batch, or a stack of them)."""


class Engine:
    """The graph functions of one step body.

    Holds the body (which holds the states' fields, never the states
    themselves, so that a step's per-state cache lets states die).
    """

    def __init__(
        self,
        spec: StepSpec,
        body: Body,
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
            Rollback(body.rollback_variables, body.held_variables) if self.guarded else None
        )
        _check_xla(spec, body)
        one = body.one
        if spec.jit_compile:
            # Keras' random ops (Dropout's masks) drawn with threefry: XLA on CPU compiles
            # the default algorithm to a draw several times slower than the plain graph's
            # (`benchmarks/xla_random.py`).
            one = _xla_function(one)
        elif self.strategy is None:
            # A function of its own, as Keras' `one_step_on_data`: the step's graph is
            # then optimised alike whether one call runs it once or in a loop, so
            # fused calls give bit for bit the variables of single ones. Its
            # signature follows the caller's (exact: the feature checks see real sizes).
            # (Not under a strategy: a nested function cannot hold the body's
            # cross-replica synchronisation.)
            one = tf.function(one, autograph=False)
        self.one = one
        # XLA with several steps per call: a call's batches run in one XLA loop
        # (`_run_group`), as JAX runs a `lax.scan`, fed a group of batches by the data
        # (`on_groups`) or stacked from the ones pulled (`_on_pulled`).
        self.groups = spec.jit_compile and spec.steps_per_call > 1 and self.strategy is None
        if self.groups:
            self.run_group = _xla_function(functools.partial(_group, self))
            self.on_groups = tf.function(self._on_groups, reduce_retracing=True, autograph=False)
        # Exact signatures: `Step.__call__` traces a batch-size-free signature
        # first, widened where later batches' sizes differ (`tfpure.signature`),
        # which every later batch dispatches to. (Relaxing shapes by
        # reduce_retracing would also relax feature sizes past the checks.)
        self.on_batch = tf.function(self._on_batch, autograph=False)
        self.signatures = Signatures(body.model)
        loop = functools.partial(tf.function, reduce_retracing=True, autograph=False)
        self.on_iterator = loop(self._on_iterator)
        self.straight = spec.steps_per_call == 1 and self.strategy is None  # (`_on_next`)
        self.on_next = loop(functools.partial(_on_next, self))
        self.span = WINDOW if self.straight else spec.steps_per_call  # (`Step.span`)
        self.window = Window(self) if self.straight and self.guarded else None
        # Guarded, several steps a call on one device, in the plain graph: a call's
        # batches pulled first, its steps judged at once.
        plain = spec.steps_per_call > 1 and self.strategy is None and not spec.jit_compile
        self.fused = Fused(self) if self.guarded and plain else None

    # -- one step -----------------------------------------------------------------

    def _run_one(
        self, batch: Any, put_back: PutBack = "cond", after: Sequence[Any] = ()
    ) -> tf.Tensor:
        """One guarded step, on the one device or on every replica.

        The body's `merge` says whether to keep the step and whether it failed
        (a step a `LossScaleOptimizer` skipped is put back, yet no failure).
        `put_back` says how a step not kept is undone:

          * ``"cond"``: its shadows are saved before it and restored in a
            `tf.cond` kept functional (`compat.branch`), then, in "skip" mode,
            counted; returns "no failure";
          * ``"inline"``: nothing to undo: an unguarded step inside an XLA loop,
            the body run inline; returns "no failure";
          * ``"window"``: not here: the caller judges the step with others, by
            the state they leave (a `Window` of one-step calls, a `Fused` call),
            the step checking only that its batch held examples and a loss
            scale's overflow (under XLA, all its checks: one XLA function for
            every path); nothing is saved (the caller holds the values from
            before its steps, and puts them back after a run-time error too), and
            its updates need not wait for its forward pass; returns "keep".

        `after`: what the shadows' saving waits for (the batch, when pulling it
        may fail: no shadow is then saved, and nothing is armed).
        """
        rollback = self.rollback
        if rollback is None:
            first, held = [], []
        elif put_back == "cond":
            with tf.control_dependencies(after):
                first, held = rollback.save()
            first = first + held
        else:
            assert put_back == "window", put_back  # ("inline" steps are unguarded)
            first, held = list(after), []
        with tf.control_dependencies(first):
            if put_back == "inline":
                out = self.body.one(batch)
            else:
                # Under XLA a step judged later is judged too: its XLA function is then
                # the one the per-step paths (a ragged group) compile, not a second.
                judge = put_back == "cond" or self.spec.jit_compile
                out = self._dispatch(batch, judge, ordered=put_back == "cond")
            keep, ok = self.body.merge(out, record=put_back == "cond")
        with tf.control_dependencies([keep, ok]):
            done = [self.examples.assign_add(_examples_in(self, batch))]
        if rollback is not None and put_back == "cond":
            kept = branch(
                keep, lambda: tf.constant(True), lambda: self._undo(held), self.strategy is None
            )
            with tf.control_dependencies([kept, *done]):
                done = [rollback.disarm()]
        with tf.control_dependencies(done):
            return tf.identity(keep if put_back == "window" else ok)

    def _undo(self, held: list[tf.Tensor]) -> tf.Tensor:
        """The branch of a step not kept: its shadows and `held` values put back; then,
        in "skip" mode, the body counts the skip. False."""
        assert self.rollback is not None
        with tf.control_dependencies(self.rollback.restore(held)):
            skips = self.body.on_skip() if self.spec.nonfinite == "skip" else []
        with tf.control_dependencies(skips):
            return tf.constant(False)

    def _dispatch(self, batch: Any, judge: bool = True, ordered: bool = True) -> Any:
        """Runs the body on the one device, or on every replica of the strategy.

        A multi-worker strategy feeds per-replica batches (its iterators are
        distributed, to shard the data between workers). In one process the
        global batch is split inside the graph instead (`replica_share`): the
        data then flows through an ordinary iterator, which costs less per
        epoch than a distributed one. (`judge`, `ordered`: see `Body.one`.)
        """
        if self.strategy is None:
            if self.spec.jit_compile:
                return self._xla_checked(self.one, batch, judge)
            return self.one(batch, judge) if ordered else self.one(batch, judge, False)
        assert judge  # (a call is judged at its end on one device only)
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
        """Up to `k` steps pulled from `iterator`, each judged on its own: (steps run, logs).
        (Under XLA, a whole call's batches stacked in one XLA loop: `_on_pulled`.)"""
        self.count_trace()
        if self.groups and _dense(iterator.element_spec):
            i, ok = branch(
                tf.equal(k, self.spec.steps_per_call),
                lambda: _on_pulled(self, iterator),
                lambda: self._step_loop(iterator, k),
                functional=True,
            )
        else:
            i, ok = self._step_loop(iterator, k)
        with tf.control_dependencies(self._assert_kept(ok)):
            return tf.identity(i), self.body.logs()

    def run_iterator(self, iterator: Any, k: tf.Tensor) -> tuple[tf.Tensor, Logs]:
        """Up to `k` steps pulled from `iterator`: (steps run, logs). A guarded plain-graph
        engine of several steps a call, called eagerly on dense batches, judges them at
        once (`Fused`); inside a caller's graph (which no Python can watch) each step is
        judged on its own."""
        if self.fuses(iterator.element_spec) and tf.executing_eagerly():
            return Runner(self.fused, iterator, ahead=False)(k)
        return self.on_iterator(iterator, k)

    @property
    def _stops_on_failure(self) -> bool:
        return self.guarded and self.spec.nonfinite == "raise"

    def _step_loop(
        self, iterator: Any, k: tf.Tensor, pulled: tuple[list, tf.Tensor] | None = None
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """Up to `k` steps, each on a batch pulled from `iterator`: (steps run, no failure).

        `pulled`: (lists, start): the batches are read back from these lists of batches a
        `Fused` runner pulled (one list per leaf), from index `start`, instead (`iterator`
        then gives only their spec).
        """
        stop_on_failure = self._stops_on_failure

        def batch_for(i: tf.Tensor) -> Any:  # (an optional: empty at the data's end)
            if pulled is None:
                return iterator.get_next_as_optional()
            lists, start = pulled
            return tf.experimental.Optional.from_value(_read_back(iterator, lists, start + i))

        i, ok = tf.constant(0), tf.constant(True)
        if self.spec.steps_per_call == 1:  # Straight-line: no loop machinery.
            batch = batch_for(i)
            return tf.cond(
                batch.has_value(),
                lambda: (i + 1, self._run_one(batch.get_value())),
                lambda: (i, ok),
            )
        i, (ok,) = loop_over_batches(
            batch_for,
            iterator.element_spec,
            k,
            lambda i, batch, carry: (self._run_one(batch),),
            (ok,),
            (lambda carry: carry[0]) if stop_on_failure else None,
        )
        return i, ok

    def _on_groups(self, iterator: Any, k: tf.Tensor) -> tuple[tf.Tensor, Logs]:
        """A call on one group of batches from `iterator` (of `group_batches(data, k)`).

        Batches alike in shape (every group, but perhaps the last) are
        stacked and run in one XLA loop; a group of unlike ones (a ragged last
        batch) runs one step at a time. At most `k` steps run: a loop calls
        with `k` equal to the group's size (the last group may be shorter).
        """
        self.count_trace()
        optional = iterator.get_next_as_optional()

        def present() -> tuple[tf.Tensor, tf.Tensor]:
            group = optional.get_value()
            leaves = tf.nest.flatten(group)
            n = _rows(leaves[0])
            ragged = [t for t in leaves if isinstance(t, tf.RaggedTensor)]
            lengths = [t.row_lengths() for t in ragged]
            alike = tf.reduce_all(
                [tf.reduce_all(tf.equal(r, r[0])) for r in lengths] or [tf.constant(True)]
            )

            def stacked() -> tuple[tf.Tensor, tf.Tensor]:
                dense = [_stacked(t, n) for t in leaves]
                return self._group_call(tf.nest.pack_sequence_as(group, dense))

            def each() -> tuple[tf.Tensor, tf.Tensor]:
                def row(i: tf.Tensor) -> Any:
                    return tf.nest.map_structure(lambda t: _row(t, i), group)

                return self._steps(tf.minimum(n, k), row, self._run_one)

            return branch(tf.logical_and(alike, n <= k), stacked, each, functional=True)

        absent = lambda: (tf.constant(0), tf.constant(True))  # noqa: E731
        i, ok = branch(optional.has_value(), present, absent, functional=True)
        with tf.control_dependencies(self._assert_kept(ok)):
            return tf.identity(i), self.body.logs()

    def _steps(
        self, n: tf.Tensor, batch: Callable[[tf.Tensor], Any], run: Callable[[Any], tf.Tensor]
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """``run(batch(i))`` for each i < `n` (in "raise" mode, up to the first failure):
        (steps run, no failure)."""
        stop_on_failure = self._stops_on_failure

        def cond(i: tf.Tensor, ok: tf.Tensor) -> tf.Tensor:
            return tf.logical_and(i < n, ok) if stop_on_failure else i < n

        def body(i: tf.Tensor, ok: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            return i + 1, run(batch(i))

        return tf.while_loop(cond, body, (tf.constant(0), tf.constant(True)))

    def _xla_checked(self, fn: Any, batch: Any, *args: Any) -> Any:
        """``fn(batch)``, an XLA function, after the body's checks of `batch` (XLA makes
        no run-time check: a label out of range gives a NaN, not an error). Traced first,
        so the checks know what the body met (the class count of its labels)."""
        fn.get_concrete_function(batch, *args)
        with tf.control_dependencies(self.body.label_checks(batch)):
            return fn(batch, *args)

    def _group_call(self, stacked: Any) -> tuple[tf.Tensor, tf.Tensor]:
        """The steps of one XLA call over the leading axis of `stacked` (`_group`), and if
        they were put back, again one at a time under the whole guard, each an XLA step
        of its own (the single-step function the per-step paths share: nothing more to
        compile, and compiled only once a call fails). Returns (steps run, no failure)."""
        i, kept = self._xla_checked(self.run_group, stacked)
        if self.rollback is None:
            return i, kept
        steps = tf.shape(tf.nest.flatten(stacked)[0])[0]
        return branch(
            kept,
            lambda: (i, tf.constant(True)),
            lambda: self._steps(steps, lambda j: _nth(stacked, j), self._run_one),
            functional=True,
        )

    def _written(self) -> list[Any]:
        """Every variable a guarded call's steps may write (a call judged at its end holds
        their values from before it)."""
        assert self.rollback is not None
        also = [part for v in self.body.also_written for part in components(v)]
        return [*self.rollback.covered, *also, self.examples]

    def fuses(self, element_spec: Any, grouped: bool = False) -> bool:
        """Whether calls on batches of `element_spec` run as `Fused` calls (dense ones,
        not grouped, of a guarded plain-graph engine of several steps a call)."""
        return self.fused is not None and not grouped and _dense(element_spec)

    def traced(
        self, element_spec: Any, grouped: bool = False, span: bool = False, lasting: bool = False
    ) -> Any:
        """The graph function the loops run on an iterator of `element_spec` (see
        `loop_function`; a `Fused` engine's `steps`), traced: its checks ran."""
        spec = tf.data.IteratorSpec(element_spec)
        if self.fuses(element_spec, grouped):
            return self.fused.steps_function(spec, element_spec)
        return self.loop_function(grouped, span, lasting).get_concrete_function(
            spec, tf.TensorSpec([], tf.int32)
        )

    def loop_function(
        self, grouped: bool = False, span: bool = False, lasting: bool = False
    ) -> Any:
        """The graph function the loops call on an iterator, ``fn(iterator, k)``: over
        groups of batches (`grouped`), one step straight-line (`on_next`; guarded, a step
        of a `Window` when calls `span` several steps, over data that is `lasting` or
        not), or up to k."""
        if grouped:
            return self.on_groups
        if span and self.window is not None:
            return self.window.on_lasting if lasting else self.window.on_next
        return self.on_next if self.straight else self.on_iterator

    # -- recovery -------------------------------------------------------------------

    def recover(self) -> None:
        """After a failed call: puts back what the failed step moved."""
        if self.rollback is not None:
            self.rollback.recover()

    def explain_failure(self) -> str:
        return self.body.explain_failure()


def epoch_runner(
    engine: Engine,
    iterator: Any,
    grouped: bool = False,
    span: bool = False,
    lasting: bool = False,
) -> Callable[[tf.Tensor], tuple[Any, Logs]]:
    """A caller of `engine`'s iterator function bound to one iterator (one epoch).

    A `tf.function` call spends most of its time on dispatch when the
    step is small: it hashes the iterator's type (its whole element
    spec) on every call. The iterator and its signature are fixed for an
    epoch, so the runner resolves the concrete function once and then
    feeds it flat tensors (`tfpure.compat.flat_caller`). Under
    `run_functions_eagerly`, or inside another graph, it falls back to
    the ordinary call. A `grouped` iterator is over `group_batches` data
    (run by `on_groups`). `span`: calls may run `span` steps (`_straight`).
    `lasting`: the iterator surely holds every batch a call asks for.
    """
    if tf.config.functions_run_eagerly() or not tf.executing_eagerly():
        if grouped:
            return lambda limit: engine.on_groups(iterator, limit)
        return lambda limit: engine.run_iterator(iterator, limit)
    if engine.fuses(iterator.element_spec, grouped):
        return Runner(engine.fused, iterator)
    call = flat_caller(
        engine.loop_function(grouped, span, lasting).get_concrete_function(
            iterator, tf.TensorSpec([], tf.int32)
        ),
        iterator,
    )
    if engine.straight and not grouped:
        return _straight(engine, call, iterator, span, lasting)
    return call


def _check_xla(spec: StepSpec, body: Body) -> None:
    if spec.jit_compile and body.strategy is not None and not body.merge_free:
        raise ValueError(
            f"jit_compile=True is not supported under {type(body.strategy).__name__}: its "
            "gradient all-reduce cannot run inside XLA. Use jit_compile=False there."
        )


# The most steps a loop at one step a call runs between two looks at the state (`Window`).
WINDOW = 64
# A window holds its batches: past its `HELD_STEPS`-th step, only while they take at most
# `HELD_BYTES` (each as many as its first).
HELD_STEPS = 16
HELD_BYTES = 32 * 2**20
# A loop whose actions or saves come every fewer steps judges each step: a window's two
# calls of its own (to save and to judge the state) would cost more than the per-step guard.
SHORTEST_WINDOW = 4


class Window:
    """The guard's window at one step a call on one device: calls judged together.

    A loop whose calls span several steps (nothing looks at the state between
    them: no batch hook listens, no action or save is due) runs a call of n
    steps in windows of n steps, or of `_window_length` where fewer (their
    batches' bytes), each as graph calls of `on_next` (of `on_lasting` over data the loop
    knows lasts to the window's end: its steps do not count the batches they
    pull, and any `OutOfRangeError` is a step's error), each step unjudged
    (``put_back="window"``: it checks only that its batch held examples and a
    loss scale's overflow;
    its updates need not wait for its forward pass) and handing back its
    batch, then judges the state the window leaves once
    (`Body.verdict`, as a fused call is judged). The window holds the values
    from its start of every variable the steps may write (`Engine._written`),
    read by `open` and held in Python while the window runs (a step's update
    then writes to new memory instead of over them; no shadow variables: a
    `Fused` call copies them into variables of its own, in its graph call). A
    window not kept, or a call that fails at run time (its step, or the data
    with anything but its end), puts them back and runs the window's batches
    again one step at a time under the whole guard
    (`Engine.on_batch`):
    the run then ends where single steps end, bit for bit; the failure costs
    the window twice. The data's end judges the steps before it.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.written: list[Any] | None = None  # (`Engine._written`, at the first window)
        self.before: list[tf.Tensor] = []  # their values from the window's start, while it runs
        self.kept = variable(True, "tfpure_window_kept")
        self.pulled = variable(0, "tfpure_window_pulled")  # batches the window's steps got
        self.on_next = tf.function(self._on_next, reduce_retracing=True, autograph=False)
        self.on_lasting = tf.function(
            functools.partial(self._on_next, counted=False), reduce_retracing=True, autograph=False
        )
        self.open = tf.function(self._open, autograph=False)
        self.close = tf.function(self._close, autograph=False)
        # Every variable the steps may write given its value from the window's start back,
        # in one graph call (traced at the first failure: an interrupt cannot cut it).
        self.put_back = tf.function(lambda before: _put_back(self.written, before), autograph=False)
        self._open_call: Callable[[], Any] = self.open  # (flat callers at the first window)
        self._close_call: Callable[[], Any] = self.close

    def _on_next(
        self, iterator: Any, k: tf.Tensor, counted: bool = True
    ) -> tuple[tf.Tensor, Logs, Any]:
        """One unjudged step on the iterator's next batch: (1, logs, the batch). `k` is 1.
        Not `counted` (`on_lasting`): over data that surely lasts, no count of the batches
        pulled (the data's end is then an error too)."""
        del k
        engine = self.engine
        engine.count_trace()
        batch = iterator.get_next()
        arrived = tf.nest.flatten(batch, expand_composites=True)
        step_batch = batch
        if counted:
            with tf.control_dependencies(arrived):
                pulled = self.pulled.assign_add(1)
            # Every op of the step waits for the batch (the data's end writes nothing), and
            # every op that reads it waits for the count too (a step failing on its batch
            # has counted it); the others (reading the weights) need not wait for the count.
            with tf.control_dependencies([pulled]):
                step_batch = tf.nest.map_structure(tf.identity, batch, expand_composites=True)
        keep = engine._run_one(step_batch, "window", after=arrived)
        with tf.control_dependencies([self.kept.assign(tf.logical_and(self.kept, keep))]):
            return tf.constant(1), engine.body.logs(), batch

    def _open(self) -> list[tf.Tensor]:
        with tf.control_dependencies([self.kept.assign(True), self.pulled.assign(0)]):
            return [tf.convert_to_tensor(v) for v in self.written]

    def _close(self) -> tf.Tensor:
        """Whether the window is kept: each step so far, then the state they left
        (`Body.verdict`). Nothing is put back here: the rare window not kept is put back
        by `_restore`, a call of its own, so a window's graph holds no put-back branch
        (capturing every variable and its value from the start, it cost a third of a
        window's trace)."""
        return _verdict(self.engine, self.pulled.read_value(), self.kept.read_value())

    def _restore(self) -> None:
        self.put_back(self.before)

    def run(
        self, call: Any, limit: tf.Tensor, n: int, spec: Any, lasting: bool = False
    ) -> tuple[int, Logs]:
        """Up to `n` steps, ``call(limit)`` each (the flat caller of `on_next`, or of
        `on_lasting` over `lasting` data), judged once a window (`_window_length` steps,
        fewer at the end): (steps run, logs). The data's end ends the window, and the
        call, early. `spec`: the batches' (the iterator's element spec)."""
        if self.written is None:
            self.written = self.engine._written()
            # Called as the steps are (`flat_caller`): a window's two calls of its own
            # cost about a step's dispatch each on a small model.
            self._open_call = flat_caller(self.open.get_concrete_function())
            self._close_call = flat_caller(self.close.get_concrete_function())
        done, logs, ended = 0, {}, False
        while done < n and not ended:  # windows of `_window_length` steps
            self.before = self._open_call()
            try:
                ran, logs, ended = self._run(call, limit, n - done, spec, lasting)
            finally:
                self.before = []  # (held no longer: the steps after it update in place)
            done += ran
        return done, logs

    def _run(
        self, call: Any, limit: tf.Tensor, n: int, spec: Any, lasting: bool
    ) -> tuple[int, Logs, bool]:
        """One window of up to `n` steps: (steps run, logs, whether the data ended)."""
        batches: list[Any] = []
        logs: Logs = {}
        try:
            while len(batches) < n:
                _, logs, batch = call(limit)
                batches.append(batch)
                if len(batches) == 1:
                    n = min(n, _window_length(batch))
        except tf.errors.OpError as err:
            failed = lasting or not isinstance(err, tf.errors.OutOfRangeError)
            if failed or int(self.pulled.numpy()) > len(batches):
                # The step failed (over lasting data, whatever the error), or the data did
                # (then the ops of the step that read no batch may have run): put back,
                # and the steps before it one at a time.
                self._restore()
                self._again(batches, spec)
                raise
            # The data's end: the steps before it are judged as a shorter window.
            return (
                len(batches),
                (self._judged(batches, logs, spec) if batches else self.engine.body.logs()),
                True,
            )
        except BaseException:  # (a KeyboardInterrupt between steps: the state left judged)
            self._judged(batches, logs, spec)
            raise
        return len(batches), self._judged(batches, logs, spec), False

    def _judged(self, batches: list[Any], logs: Logs, spec: Any) -> Logs:
        if bool(self._close_call()):
            return logs
        self._restore()
        return self._again(batches, spec)

    def _again(self, batches: list[Any], spec: Any) -> Logs:
        """The window's `batches` one step at a time under the whole guard, from its start
        (`Engine.on_batch`, traced for `spec` at the first failure)."""
        logs = self.engine.body.logs()
        if batches:
            step = self.engine.on_batch.get_concrete_function(spec)
            for batch in batches:
                logs = step(batch)
        return logs


class Fused:
    """The guard of fused calls (several steps a call, on one device, in the plain graph,
    called eagerly): a call's steps judged at once, by the state they leave.

    The batches a call runs are pulled before it (the call before pulls them, in
    the same graph call as its own steps, as an unguarded call pulls each batch
    while the step before runs; for the first call of a `Runner`, a call of
    `steps` that runs none) and held in Python as lists (one per leaf). A call
    first copies every variable its steps may write (`Engine._written`) into a
    variable of its own, in the same graph call (no call of its own to read
    them: on a small model that call cost as much as the rest of the guard),
    then stamps the copy with the call's number (`stamp`), so that after a
    failure the copy is known to hold the values from before this call.
    `steps` runs the call's steps on them unjudged (``put_back="window"``:
    each checks only that its batch held examples and a loss scale's overflow;
    its updates need not wait for its forward pass; the first step not kept
    ends them) and judges the state they leave (`Body.verdict`: a non-finite
    weight, slot, statistic or sum stays non-finite through the steps after
    the one that wrote it). A call not kept, or whose steps fail at run time
    once the copy is stamped, is put back (`restore`) and its batches run again
    one step at a time under the whole guard (`replay`, a function of its own
    that only a failed call traces): it ends where single steps end, bit for
    bit, the failing step raising its error again. An error of the data
    (anything but its end) raises from the call that pulls the batch, before the
    steps of the batches it pulled ahead of it run: those are never run or
    judged. What a guarded step costs per step (saving shadows, the put-back
    branch, the wait for the forward pass) is then paid once per call, and only
    when it fails; a call's copy costs one more copy of the training state.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.written = engine._written()
        self.copies = [variable(tf.convert_to_tensor(v), "tfpure_call_start") for v in self.written]
        # The number of the last call whose copy is whole; `calls`: of the calls made.
        self.stamp = variable(tf.constant(0, tf.int64), "tfpure_call_stamp")
        self.calls = 0
        loop = functools.partial(tf.function, reduce_retracing=True, autograph=False)
        self.steps, self.replay = loop(self._steps), loop(self._replay)
        self.restore = tf.function(
            lambda: _put_back(self.written, [c.read_value() for c in self.copies]),
            autograph=False,
        )

    def copied(self) -> bool:
        """After a failed call: whether its copy is whole (it then may have run steps)."""
        stamped = int(self.stamp.numpy())
        whole = stamped == self.calls
        self.calls = stamped  # (a call whose copy was not made counts no more)
        return whole

    def _pull(self, iterator: Any, k: tf.Tensor) -> tuple[tf.Tensor, list]:
        """Up to `k` batches pulled into lists: (how many, the lists)."""
        lists = _empty_lists(iterator.element_spec)

        def push(i: tf.Tensor, batch: Any, carry: tuple) -> tuple:
            return tuple(
                tf.raw_ops.TensorListPushBack(input_handle=h, tensor=t)
                for h, t in zip(carry, tf.nest.flatten(batch), strict=True)
            )

        n, lists = loop_over_batches(
            lambda i: iterator.get_next_as_optional(), iterator.element_spec, k, push, tuple(lists)
        )
        return n, list(lists)

    def _steps(
        self, iterator: Any, lists: list, start: tf.Tensor, n: tf.Tensor, ahead: tf.Tensor
    ) -> tuple:
        """The steps of the `n` batches of `lists` from `start`, unjudged, then judged at
        once; meanwhile up to `ahead` more batches pulled: (kept, logs, pulled, lists).
        (With `n` 0: a pull alone, the state judged as it stands.)"""
        engine = self.engine
        engine.count_trace()
        pairs = zip(self.copies, self.written, strict=True)
        copied = [c.assign(tf.convert_to_tensor(v)) for c, v in pairs]
        with tf.control_dependencies(copied):
            stamped = self.stamp.assign_add(1)
        with tf.control_dependencies([stamped]):
            n = tf.identity(n)  # (the steps wait for the copy: the loop's count does)
        i, (keep,) = loop_over_batches(
            lambda i: tf.experimental.Optional.from_value(_read_back(iterator, lists, start + i)),
            iterator.element_spec,
            n,
            lambda i, batch, carry: (engine._run_one(batch, "window"),),
            (tf.constant(True),),
            lambda carry: carry[0],  # (a call not kept runs again: no need to go on)
        )
        return (_verdict(engine, i, keep), engine.body.logs(), *self._pull(iterator, ahead))

    def steps_function(self, iterator: Any, element_spec: Any) -> Any:
        """`steps` traced for `iterator` (an iterator, or a `tf.data.IteratorSpec`) of
        batches of `element_spec`."""
        n = tf.TensorSpec([], tf.int32)
        lists = [tf.TensorSpec([], tf.variant)] * len(tf.nest.flatten(element_spec))
        return self.steps.get_concrete_function(iterator, lists, n, n, n)

    def _replay(
        self, iterator: Any, lists: list, start: tf.Tensor, n: tf.Tensor
    ) -> tuple[tf.Tensor, Logs]:
        """A call's `n` batches (of `lists`, from `start`) run again one step at a time
        under the whole guard, once it is put back (`restore`): (steps run, logs)."""
        engine = self.engine
        engine.count_trace()
        j, ok = engine._step_loop(iterator, n, (lists, start))
        with tf.control_dependencies(engine._assert_kept(ok)):
            return tf.identity(j), engine.body.logs()


class Runner:
    """The calls of a `Fused` engine on one iterator: ``runner(limit) -> (steps run, logs)``.

    Holds the batches its last call pulled ahead for the next ones (`ahead`:
    a loop's runner, which lives as long as its iterator; a direct call's pulls
    a call's batches alone), so a call's batches are pulled while the call before
    runs its steps. A call runs `limit` steps (fewer at the data's end), on the
    batches held, then on those pulled ahead.
    """

    def __init__(self, fused: Fused, iterator: Any, ahead: bool = True):
        self.fused, self.ahead = fused, ahead
        self.k = fused.engine.spec.steps_per_call
        if tf.config.functions_run_eagerly():
            steps = functools.partial(fused.steps, iterator)
        else:  # (a flat caller, `flat_caller`: the loops call it once a call)
            flat = flat_caller(fused.steps_function(iterator, iterator.element_spec), iterator)
            steps = lambda lists, *rest: flat(*lists, *rest)  # noqa: E731
        self._call_steps = steps
        self._replay = functools.partial(fused.replay, iterator)
        self.lists: list = _empty_lists(iterator.element_spec)
        self.held = self.at = 0  # batches held, and the next one's index
        self.ended = False  # no batch after those held

    def __call__(self, limit: tf.Tensor) -> tuple[int, Logs]:
        want, ran, logs = int(limit), 0, None
        while ran < want:
            if self.at == self.held and (self.ended or not self._refill(want - ran)):
                break
            n = min(want - ran, self.held - self.at)
            logs = self._call(n, self.at + n == self.held and not self.ended and self.ahead)
            ran += n
        return ran, self.fused.engine.body.logs() if logs is None else logs

    def _refill(self, want: int) -> int:
        """Pulls the next call's batches (a call's, or `want` for a direct call): a call of
        `steps` that runs none."""
        zero, pull = tf.constant(0), tf.constant(self.k if self.ahead else want)
        try:
            _, _, held, self.lists = self._steps(self.lists, zero, zero, pull)
        except BaseException:
            self.fused.copied()  # (no step ran: nothing to put back)
            raise
        self.held, self.at = int(held), 0
        self.ended = self.held < (self.k if self.ahead else want)
        return self.held

    def _call(self, n: int, ahead: bool) -> Logs:
        """`n` steps on the held batches (pulling the next call's if `ahead`)."""
        lists, at, count = self.lists, tf.constant(self.at), tf.constant(n)
        fused = self.fused
        try:
            kept, logs, held, pulled = self._steps(
                lists, at, count, tf.constant(self.k if ahead else 0)
            )
        except BaseException as err:  # (a run-time error, or an interrupt once the steps ran)
            if fused.copied():  # (else no step ran)
                fused.restore()
            if isinstance(err, tf.errors.OpError):
                self._replay(lists, at, count)  # the failing step raises again
            raise
        if not bool(kept):
            fused.restore()
            _, logs = self._replay(lists, at, count)
        self.at += n
        if ahead:
            self.lists, self.held, self.at = pulled, int(held), 0
            self.ended = self.held < self.k
        return logs

    def _steps(self, *args: Any) -> tuple:
        self.fused.calls += 1
        return self._call_steps(*args)


def _on_next(engine: Engine, iterator: Any, k: tf.Tensor) -> tuple[tf.Tensor, Logs]:
    """One step on the iterator's next batch, straight-line (`k` is 1): no branch on
    whether a batch came, whose capture of every variable costs a trace time and a
    step's run time; the data's end raises `OutOfRangeError` instead, before
    anything is written (`epoch_runner` turns it into "0 steps run")."""
    engine.count_trace()
    batch = iterator.get_next()
    ok = engine._run_one(batch, after=tf.nest.flatten(batch, expand_composites=True))
    with tf.control_dependencies(engine._assert_kept(ok)):
        return tf.constant(1), engine.body.logs()


def _examples_in(engine: Engine, batch: Any) -> tf.Tensor:
    """The number of examples in `batch`: the leading size of its first leaf."""
    leaves = tf.nest.flatten(batch)
    if not leaves:
        return tf.constant(1, tf.int64)
    parts = engine.strategy.experimental_local_results(leaves[0]) if engine.sharded else leaves[:1]
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


def _straight(
    engine: Engine, call: Any, iterator: Any, span: bool, lasting: bool
) -> Callable[[tf.Tensor], Any]:
    """The runner of a straight engine bound to `iterator`: ``run(limit)`` runs `limit`
    steps, one graph call each (`call`: the flat caller of `Engine.loop_function`), and
    returns (steps run, logs). Guarded, with calls that `span` steps, every call is one
    `Window` (`call` then runs its steps; over `lasting` data, uncounted)."""
    window = engine.window if span else None

    def run(limit: tf.Tensor) -> tuple[Any, Logs]:
        n = int(limit)
        if window is not None:
            return window.run(call, limit, n, iterator.element_spec, lasting)
        ran, logs = 0, None
        for _ in range(n):  # (n >= 1: `logs` is set)
            done, logs = _until_the_end(call, engine, limit)
            if not int(done):
                break
            ran += 1
        return ran, logs

    return run


def _until_the_end(call: Any, engine: Engine, limit: tf.Tensor) -> tuple[tf.Tensor, Logs]:
    """``call(limit)`` of `Engine.on_next`, or at the data's end (nothing written):
    0 steps run and the body's logs as they stand. (A guarded step that raises it past
    its batch, from an op of a user's body, finds its put-back armed: that is an error
    of the step, raised on, and the caller recovers the state as from any other.)"""
    try:
        return call(limit)
    except tf.errors.OutOfRangeError:
        if engine.rollback is not None and bool(engine.rollback.armed.numpy()):
            raise
        return tf.constant(0), engine.body.logs()


def _window_length(batch: Any) -> int:
    """The steps of a window whose first batch is `batch`: `WINDOW`, fewer where that
    many such batches would take more than `HELD_BYTES`, and at least `HELD_STEPS`."""
    size = sum(
        leaf.shape.num_elements() * max(leaf.dtype.size, 1)  # (a string: a byte or more)
        for leaf in tf.nest.flatten(batch, expand_composites=True)
    )
    return max(HELD_STEPS, min(WINDOW, HELD_BYTES // max(size, 1)))


def _dense(element_spec: Any) -> bool:
    """Whether batches of `element_spec` are dense tensors (no ragged or sparse leaf)."""
    return all(isinstance(s, tf.TensorSpec) for s in tf.nest.flatten(element_spec))


def _empty_lists(element_spec: Any) -> list[tf.Tensor]:
    """An empty tensor list per leaf of batches of `element_spec`."""
    return [
        tf.raw_ops.EmptyTensorList(
            element_shape=tf.constant(-1), max_num_elements=-1, element_dtype=spec.dtype
        )
        for spec in tf.nest.flatten(element_spec)
    ]


def _on_pulled(engine: Engine, iterator: Any) -> tuple[tf.Tensor, tf.Tensor]:
    """A full call under XLA: `steps_per_call` batches pulled, stacked, run in one XLA loop.

    For an iterator of single batches (`on_groups` is cheaper: the data
    groups them). Batches of different shapes (a ragged last batch), or
    fewer than a call's (the end of the data), run one at a time instead
    (`_run_pulled`). A failed step in "raise" mode stops the call; the
    batches pulled after it are consumed unrun.
    """
    pulled = [iterator.get_next_as_optional() for _ in range(engine.spec.steps_per_call)]
    present = tf.add_n([tf.cast(o.has_value(), tf.int32) for o in pulled])

    def full() -> tuple[tf.Tensor, tf.Tensor]:
        batches = [tf.nest.flatten(o.get_value()) for o in pulled]
        same = tf.reduce_all(
            [
                tf.reduce_all(tf.equal(tf.shape(a), tf.shape(b)))
                for other in batches[1:]
                for a, b in zip(batches[0], other, strict=True)
                if a.shape.rank  # (scalars are alike)
            ]
            or [tf.constant(True)]
        )

        def stacked() -> tuple[tf.Tensor, tf.Tensor]:
            leaves = [tf.stack(group) for group in zip(*batches, strict=True)]
            stacked = tf.nest.pack_sequence_as(iterator.element_spec, leaves)
            return engine._group_call(stacked)

        each = lambda: _run_pulled(engine, pulled, present)  # noqa: E731
        return branch(same, stacked, each, functional=True)

    return branch(
        tf.equal(present, len(pulled)),
        full,
        lambda: _run_pulled(engine, pulled, present),
        functional=True,
    )


def _run_pulled(engine: Engine, pulled: list[Any], present: tf.Tensor) -> tuple:
    """The `present` batches of `pulled` (optionals), one step each: (steps run, no failure)."""
    getters = [o.get_value for o in pulled]
    return engine._steps(present, lambda i: tf.switch_case(i, getters), engine._run_one)


def _group(engine: Engine, stacked: Any) -> tuple[tf.Tensor, tf.Tensor]:
    """The steps of one XLA call, over the leading axis of `stacked`: (steps, kept).

    Guarded, the call is judged at its end, as a `Fused` call is:
    its steps run unjudged, holding the values from before the call; if a step or
    the `verdict` fails, everything is put back and the call is not kept (the caller
    runs its steps again, `Engine._group_call`). XLA runs only the branch taken.
    """
    steps = tf.shape(tf.nest.flatten(stacked)[0])[0]
    if engine.rollback is None:
        inline = functools.partial(engine._run_one, put_back="inline")
        return engine._steps(steps, lambda i: _nth(stacked, i), inline)
    written = engine._written()
    before = [tf.convert_to_tensor(v) for v in written]

    def cond(i: tf.Tensor, keep: tf.Tensor) -> tf.Tensor:
        return tf.logical_and(i < steps, keep)

    def body(i: tf.Tensor, keep: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return i + 1, _unjudged(engine, _nth(stacked, i))

    i, keep = tf.while_loop(cond, body, (tf.constant(0), tf.constant(True)))
    keep = _verdict(engine, i, keep)
    restored = tf.cond(keep, lambda: tf.constant(True), lambda: _put_back(written, before))
    with tf.control_dependencies([restored]):
        return tf.identity(i), tf.identity(keep)


def _verdict(engine: Engine, i: tf.Tensor, keep: tf.Tensor) -> tf.Tensor:
    """Whether a call (or a `Window`) judged at its end is kept: its steps (`i` run,
    `keep` so far) and then the state they left (`Body.verdict`: a non-finite value a
    step wrote stays non-finite through the steps after it, see `docs/steps.md`)."""
    with tf.control_dependencies([i, keep]):
        return tf.logical_and(keep, engine.body.verdict())


def _nth(stacked: Any, i: tf.Tensor) -> Any:
    """Batch `i` of batches stacked along their leading axis."""
    return tf.nest.map_structure(lambda t: t[i], stacked)


def _unjudged(engine: Engine, batch: Any) -> tf.Tensor:
    """Inside XLA, a step of a call judged at its end: the body inline and unjudged
    (``Body.one(batch, judge=False)``); returns whether to keep it so far."""
    keep, _ = engine.body.merge(engine.body.one(batch, False), record=False)
    with tf.control_dependencies([keep]):
        counted = engine.examples.assign_add(_examples_in(engine, batch))
    with tf.control_dependencies([counted]):
        return tf.identity(keep)


def _read_back(iterator: Any, lists: Sequence[tf.Tensor], j: tf.Tensor) -> Any:
    """Batch `j` of those a `Fused` runner pulled into `lists` (one list per leaf)."""
    leaves = []
    for handle, spec in zip(lists, tf.nest.flatten(iterator.element_spec), strict=True):
        leaf = tf.raw_ops.TensorListGetItem(
            input_handle=handle, index=j, element_shape=tf.constant(-1), element_dtype=spec.dtype
        )
        leaf.set_shape(spec.shape)
        leaves.append(leaf)
    return tf.nest.pack_sequence_as(iterator.element_spec, leaves)


def _put_back(written: Sequence[Any], before: Sequence[tf.Tensor]) -> tf.Tensor:
    """True, once every variable `written` got its value from `before` back."""
    with tf.control_dependencies([v.assign(b) for v, b in zip(written, before, strict=True)]):
        return tf.constant(True)


def can_group(element_spec: Any) -> bool:
    """Whether batches of `element_spec` can be grouped: dense, only their first size free."""
    return all(
        isinstance(s, tf.TensorSpec)
        and s.shape.rank is not None
        and all(d is not None for d in s.shape.as_list()[1:])
        for s in tf.nest.flatten(element_spec)
    )


def group_batches(data: tf.data.Dataset, k: int) -> tf.data.Dataset:
    """`data`'s batches, `k` to an element: a leaf of batches alike in shape comes stacked,
    of unlike ones ragged (`Engine.on_groups` runs either). For `can_group` data.

    Example:
      >>> import tensorflow as tf
      >>> from tfpure.graph import group_batches
      >>> data = tf.data.Dataset.range(10).batch(4)  # batches of 4, 4 and 2
      >>> [g.row_lengths().numpy().tolist() for g in group_batches(data, 2)]
      [[4, 4], [2]]

    Batches of arrays (`tfpure.arrays`) are grouped as slices of the arrays,
    the same elements without stacking `k` batches for each.
    """
    groups = array_groups(data, k)
    return data.ragged_batch(k) if groups is None else groups


def _rows(leaf: Any) -> tf.Tensor:
    """The number of batches in a group's leaf."""
    return tf.cast(
        leaf.nrows() if isinstance(leaf, tf.RaggedTensor) else tf.shape(leaf)[0], tf.int32
    )


def _stacked(leaf: Any, n: tf.Tensor) -> tf.Tensor:
    """A group's leaf of batches alike in shape as one dense tensor, batches first."""
    if not isinstance(leaf, tf.RaggedTensor):
        return leaf
    values = leaf.flat_values
    size = tf.cast(leaf.row_splits[1], tf.int32)  # (every batch has the first's size)
    dense = tf.reshape(values, tf.concat([[n, size], tf.shape(values)[1:]], 0))
    dense.set_shape([None, None, *values.shape[1:]])
    return dense


def _row(leaf: Any, i: tf.Tensor) -> tf.Tensor:
    """Batch `i` of a group's leaf."""
    if not isinstance(leaf, tf.RaggedTensor):
        return leaf[i]
    splits = leaf.row_splits
    row = leaf.flat_values[splits[i] : splits[i + 1]]
    row.set_shape([None, *leaf.flat_values.shape[1:]])
    return row


def _xla_function(fn: Callable[..., Any]) -> Any:
    """`fn` as an XLA function, with threefry draws; without autograph, as the plain graph's
    functions (and tracing quicker)."""
    return tf.function(_threefry(fn), jit_compile=True, reduce_retracing=True, autograph=False)


def _threefry(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn`, traced with Keras' random ops drawing with the threefry algorithm."""

    @functools.wraps(fn)
    def traced(*args: Any) -> Any:
        if tf.executing_eagerly():  # run_functions_eagerly: no XLA, and no threefry kernel
            return fn(*args)
        with keras_random_algorithm("threefry"):
            return fn(*args)

    return traced
