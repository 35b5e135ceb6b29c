"""Steps: `make_step` for user-written bodies, `make_train_step` / `make_eval_step` built in.

A factory returns a `Step`: a callable ``state, logs = step(state, batch)``
that compiles one engine (`tfpure.graph`) per state structure it meets and
runs its body inside it. The options every step shares are a frozen
`StepSpec`; the bodies are in `tfpure.builtin` (the tutorial's loop body)
and `tfpure.custom` (yours).
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Literal

import tensorflow as tf

from tfpure.auto import AutoStep, check_auto
from tfpure.batch import Batch, check_batch, check_batch_values, unpack
from tfpure.builtin import EvalBody, TrainBody
from tfpure.custom import UserBody
from tfpure.distribute import cluster_task, strategy_of
from tfpure.graph import Engine, can_group, epoch_runner, group_batches
from tfpure.guard import MARK, NonFiniteError
from tfpure.losses import step_loss
from tfpure.signature import relaxed
from tfpure.spec import GradTransform, Nonfinite, StepSpec
from tfpure.state import leaves
from tfpure.types import Logs, StepFn

__all__ = [
    "AutoStep",
    "GradTransform",
    "Logs",
    "NonFiniteError",
    "Step",
    "StepFn",
    "StepSpec",
    "make_eval_step",
    "make_step",
    "make_train_step",
]


class Step:
    """A compiled step: ``state, logs = step(state, batch)``.

    Made by `make_step`, `make_train_step` and `make_eval_step`; not built
    directly. The step compiles its graph functions the first time it meets a
    state (or a structure of states) and keeps them while those states live.
    The first call traces a signature with the batch dimension left free, so
    every batch size (a ragged last batch included) runs the same graph; only
    a new batch structure or feature shape traces again.

    Attributes:
      spec: the `StepSpec` (options) of the step.
      kind, loss, jit_compile, steps_per_call, nonfinite: shortcuts to `spec`.

    Example:
      >>> import keras, numpy as np, tfpure as tp
      >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
      >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD(0.1))
      >>> step = tp.make_train_step(keras.losses.SparseCategoricalCrossentropy(from_logits=True))
      >>> x, y = np.ones((8, 3), "float32"), np.zeros((8,), "int32")
      >>> for _ in range(3):
      ...     state, logs = step(state, (x, y))
      >>> int(state.step), sorted(logs), step.experimental_get_tracing_count()
      (3, ['loss'], 1)
    """

    def __init__(self, spec: StepSpec):
        self.spec = spec
        # Engines by the ids of the structure's states; an entry dies with any of them.
        self._engines: dict[tuple[int, ...], tuple[list[weakref.ref], Engine]] = {}
        self._traces = 0
        self._limits: dict[int, tf.Tensor] = {}

    kind = property(lambda self: self.spec.kind)
    loss = property(lambda self: self.spec.loss)
    jit_compile = property(lambda self: self.spec.jit_compile)
    steps_per_call = property(lambda self: self.spec.steps_per_call)
    nonfinite = property(lambda self: self.spec.nonfinite)

    def _count_trace(self) -> None:
        self._traces += 1

    def engine(self, state: Any) -> Engine:
        """The engine of `state` (a state or structure of states), built on first use.

        Example:
          >>> import keras, tfpure as tp
          >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
          >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())
          >>> step = tp.make_train_step("mse")
          >>> step.engine(state) is step.engine(state)  # one engine per state
          True
        """
        try:
            found = leaves(state)
        except TypeError as err:
            raise TypeError(f"A tfpure step takes a TrainState first. {err}") from None
        if self.spec.kind != "custom" and (len(found) != 1 or found[0] is not state):
            raise TypeError(
                f"A {self.spec.kind} step built by make_{self.spec.kind}_step takes one "
                f"TrainState; got {type(state).__name__}. Steps over several states are "
                "written with tp.make_step(fn)."
            )
        key = tuple(id(s) for s in found)
        entry = self._engines.get(key)
        if entry is not None and all(ref() is s for ref, s in zip(entry[0], found, strict=True)):
            return entry[1]
        strategy = strategy_of(found)
        # Outside the strategy's scope: a plain host counter, read by the loops.
        examples = tf.Variable(0, dtype=tf.int64, trainable=False, name="examples")
        with strategy.scope() if strategy else contextlib.nullcontext():
            if self.spec.kind == "custom":
                body: Any = UserBody(self.spec, self.spec.fn, state)
            elif self.spec.kind == "train":
                body = TrainBody(self.spec, state)
            else:
                body = EvalBody(self.spec, state)
            engine = Engine(self.spec, body, self._count_trace, examples)
        refs = [weakref.ref(s, lambda _, key=key: self._engines.pop(key, None)) for s in found]
        self._engines[key] = (refs, engine)
        return engine

    def __call__(self, state: Any, batch: Batch) -> tuple[Any, Logs]:
        """Runs one step on `batch`; returns the state to use next and the logs.

        For built-in steps `logs` maps `"loss"` and each metric name to its
        running value since the metrics were last reset (as Keras reports
        them); for `make_step` bodies, each log's running mean weighted by
        batch size since `reset_logs`.
        """
        check_batch_values(batch)
        engine = self.engine(state)
        model = engine.body.model
        if self.spec.kind != "custom":
            # On the real sizes: the graph is traced for free batch (and varying) sizes.
            check_batch(model, *unpack(batch))
        # Trace for the batch's signature widened to every one seen before: sizes that
        # vary (batch, sequence length) are left free, so they trace once or twice in
        # all; a feature size the model fixes is never widened.
        signature = engine.signatures.widen(relaxed(batch))
        if signature is not None:
            engine.on_batch.get_concrete_function(signature)
        return state, self._run(engine, engine.on_batch, batch)

    def run_on_iterator(
        self, state: Any, iterator: Any, *, max_steps: int | None = None
    ) -> tuple[Any, Logs, tf.Tensor]:
        """Runs up to `steps_per_call` steps on batches from a `tf.data` iterator.

        `max_steps` lowers the bound for this call (to end an epoch of
        `steps_per_epoch` steps exactly); it is fed as a tensor, so changing
        it does not retrace.

        All the steps run in one graph call (a `tf.while_loop` over
        ``iterator.get_next_as_optional()``), so the end of the data needs no
        special case: fewer steps run, and the count says how many. With
        ``jit_compile=True`` a call of `steps_per_call` steps pulls its batches
        first and runs them in one XLA loop (stacked, if alike in shape).

        Returns:
          ``(state, logs, steps_run)``, with `steps_run` a scalar int32 tensor
          (0 once the iterator is exhausted).

        Example:
          >>> import keras, tensorflow as tf, tfpure as tp
          >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
          >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())
          >>> step = tp.make_train_step("mse", steps_per_call=4)
          >>> data = tf.data.Dataset.from_tensors((tf.ones((2, 3)), tf.ones((2, 1)))).repeat(6)
          >>> it = iter(data)
          >>> [int(step.run_on_iterator(state, it)[2]) for _ in range(3)]
          [4, 2, 0]
        """
        engine = self.engine(state)
        n, logs = self._run(engine, engine.run_iterator, iterator, self._limit(max_steps))
        return state, logs, n

    def reset_logs(self, state: Any) -> None:
        """Starts the running figures the step keeps itself afresh (the loops do this each
        epoch, with the states' metrics): a `make_step` body's log means, or a built-in
        step's per-output losses (``a_loss``, ...). A built-in step's other logs are its
        state's metrics.

        Example:
          >>> import keras, numpy as np, tfpure as tp
          >>> x = keras.Input((2,))
          >>> model = keras.Model(x, [keras.layers.Dense(1, name="a")(x),
          ...                         keras.layers.Dense(1, name="b")(x)])
          >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())
          >>> step = tp.make_eval_step("mse")
          >>> ones = np.ones((4, 1), "float32")
          >>> state, logs = step(state, (np.ones((4, 2), "float32"), [ones, ones]))
          >>> step.reset_logs(state)
          >>> float(step.results(state)["a_loss"])
          0.0
        """
        body = self.engine(state).body
        if self.spec.kind == "custom":
            body.means.reset()
        else:
            for tracker in body.loss_trackers.values():
                tracker.reset_state()

    def results(self, state: Any) -> Logs:
        """The logs the step would report for `state` now (running figures), without a step.

        Example:
          >>> import keras, tfpure as tp
          >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
          >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())
          >>> {k: float(v) for k, v in tp.make_train_step("mse").results(state).items()}
          {'loss': 0.0}
        """
        return self.engine(state).body.logs()

    def log_variables(self, state: Any) -> list[tf.Variable]:
        """The variables of the running figures the step keeps itself (see `reset_logs`);
        a checkpoint saves them with the run.

        Example:
          >>> import keras, tfpure as tp
          >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
          >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())
          >>> tp.make_train_step("mse").log_variables(state)  # one output: none
          []
        """
        body = self.engine(state).body
        if self.spec.kind == "custom":
            return body.means.variables
        return [v for tracker in body.loss_trackers.values() for v in tracker.variables]

    def examples(self, state: Any) -> int:
        """Examples that have run through the step for `state` (the loops' throughput).

        Example:
          >>> import keras, numpy as np, tfpure as tp
          >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
          >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())
          >>> step = tp.make_train_step("mse")
          >>> state, _ = step(state, (np.ones((5, 2), "float32"), np.ones((5, 1), "float32")))
          >>> step.examples(state)
          5
        """
        return int(self.engine(state).examples.numpy())

    def check_data(
        self,
        state: Any,
        element_spec: Any,
        *,
        grouped: bool = False,
        span: bool = False,
        lasting: bool = False,
    ) -> Any:
        """Traces the function that runs batches of `element_spec` from an iterator, once.

        The structure, shape and dtype checks run while tracing, so data that
        does not fit the model fails here, before a loop changes anything.
        `grouped`: the elements are groups of batches (`grouped`); `span`,
        `lasting`: for a `runner` given these. Returns the
        traced `tf.types.experimental.ConcreteFunction` (None eagerly, or
        under a multi-worker strategy: the checks then run at the first step).

        Example:
          >>> import keras, tensorflow as tf, tfpure as tp
          >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
          >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())
          >>> data = tf.data.Dataset.from_tensor_slices((tf.ones((4, 2)), tf.ones((4, 1))))
          >>> try:
          ...     tp.make_train_step("mse").check_data(state, data.batch(2).element_spec)
          ... except ValueError as err:
          ...     print("refused:", "(None, 3)" in str(err))
          refused: True
        """
        strategy = strategy_of(leaves(state))
        if not tf.config.functions_run_eagerly() and cluster_task(strategy) is None:
            return self.engine(state).traced(element_spec, grouped, span, lasting)
        return None

    def _limit(self, max_steps: int | None) -> tf.Tensor:
        k = self.spec.steps_per_call if max_steps is None else max_steps
        if not tf.executing_eagerly():  # (a constant of a graph lives in that graph only)
            return tf.constant(k, tf.int32)
        limit = self._limits.get(k)
        if limit is None:
            limit = self._limits[k] = tf.constant(k, tf.int32)
        return limit

    def grouped(self, state: Any, data: Any) -> tf.data.Dataset | None:
        """`data` grouped for this step's calls (`group_batches`), or None if they cannot be.

        Groups feed an XLA step's calls (``jit_compile=True``, ``steps_per_call``
        k > 1, no strategy) k batches in one element, so a call pulls one
        element instead of k. The caller must call with k steps each time
        (fewer only at the end of the data): a loop whose calls are all whole.

        Example:
          >>> import keras, tensorflow as tf, tfpure as tp
          >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
          >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())
          >>> data = tf.data.Dataset.from_tensor_slices((tf.ones((10, 2)), tf.ones((10, 1))))
          >>> xla = tp.make_train_step("mse", jit_compile=True, steps_per_call=2)
          >>> groups = xla.grouped(state, data.batch(4))  # batches of 4, 4 and 2
          >>> [int(x.nrows()) for x, y in groups]
          [2, 1]
          >>> print(tp.make_train_step("mse").grouped(state, data.batch(4)))
          None
        """
        if (
            not isinstance(data, tf.data.Dataset)
            or tf.config.functions_run_eagerly()
            or not can_group(data.element_spec)
            or not self.engine(state).groups
        ):
            return None
        return group_batches(data, self.spec.steps_per_call)

    def runner(
        self,
        state: Any,
        iterator: Any,
        *,
        grouped: bool = False,
        span: bool = False,
        lasting: bool = False,
    ) -> Callable[[int | None], tuple[Logs, Any]]:
        """Like `run_on_iterator`, but bound to one iterator: the loops' fast path.

        ``logs, steps_run = run(max_steps)`` runs up to `max_steps` steps (None:
        `steps_per_call`) on the iterator's next batches. A `grouped` iterator
        is over `grouped` data. `span`: the caller asks for up to `span(state)`
        steps a call while nothing looks at the state between them; at one step
        a call a guarded step then judges each call's steps together (a window).
        `lasting`: the iterator surely holds every batch the caller asks for (a
        dataset of known length, asked for no more; or repeated): a window's steps
        then need not count the batches they pull to tell the data's end from an
        `OutOfRangeError` of a step's own, which is cheaper. An `OutOfRangeError`
        is then an error of the step, as any other.

        Example:
          >>> import keras, tensorflow as tf, tfpure as tp
          >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
          >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())
          >>> step = tp.make_train_step("mse", steps_per_call=4)
          >>> data = tf.data.Dataset.from_tensors((tf.ones((2, 3)), tf.ones((2, 1)))).repeat(6)
          >>> run = step.runner(state, iter(data))
          >>> [int(run(None)[1]) for _ in range(3)]
          [4, 2, 0]
          >>> # One step a call: guard windows of up to 64 calls, over data that lasts.
          >>> one = tp.make_train_step("mse")
          >>> run = one.runner(state, iter(data.repeat()), span=True, lasting=True)
          >>> int(run(one.span(state))[1])
          64
        """
        engine = self.engine(state)
        runner = self._run(engine, epoch_runner, engine, iterator, grouped, span, lasting)

        def run(max_steps: int | None) -> tuple[Logs, Any]:
            if max_steps is not None and max_steps < 1:  # a call of no step
                return engine.body.logs(), tf.constant(0)
            n, logs = self._run(engine, runner, self._limit(max_steps))
            return logs, n

        return run

    def span(self, state: Any) -> int:
        """The most steps one `runner` call runs for `state`: `steps_per_call`, or at one
        step a call on one device 64 graph calls, which a guarded step judges together,
        in one window or, where 64 of its batches would take more than 32 MiB, in
        windows of fewer (at least 16) (the loops ask for that many while no batch hook
        listens and no action is due: nothing looks at the state between the steps).

        Example:
          >>> import keras, tfpure as tp
          >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
          >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())
          >>> [tp.make_train_step("mse", steps_per_call=k).span(state) for k in (1, 4)]
          [64, 4]
        """
        if tf.config.functions_run_eagerly():
            return self.spec.steps_per_call
        return self.engine(state).span

    def _run(self, engine: Engine, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except tf.errors.OpError as err:
            engine.recover()
            if MARK in err.message:
                maker = "make_step" if self.spec.kind == "custom" else "make_train_step"
                raise NonFiniteError(
                    f"{engine.explain_failure()}. No variable changed. Pass "
                    f"nonfinite='skip' to {maker} to skip such batches instead."
                ) from None
            raise _cause_first(err) from None

    def experimental_get_tracing_count(self) -> int:
        """How many times this step's graph functions were traced, over all states.

        Example:
          >>> import keras, tfpure as tp
          >>> tp.make_eval_step("mse").experimental_get_tracing_count()
          0
        """
        return self._traces

    def __repr__(self) -> str:
        s = self.spec
        return (
            f"Step(kind={s.kind!r}, jit_compile={s.jit_compile}, "
            f"steps_per_call={s.steps_per_call}, nonfinite={s.nonfinite!r})"
        )


_NUMBERS = re.compile(r"[-+\d.e\s]*(\.\.\.)?[-+\d.e\s]*")  # an assertion's tensor, printed


def _cause_first(err: tf.errors.OpError) -> tf.errors.OpError:
    r"""`err` with the failing op's own words as its first line.

    A graph's run-time error reads "Graph execution error:", then where the
    failing op was defined; what went wrong ("Received a label value of 5
    which is outside the valid range of [0, 3)") comes last.

    Example:
      >>> import tensorflow as tf
      >>> from tfpure.steps import _cause_first
      >>> err = tf.errors.InvalidArgumentError(
      ...     None, None, "Graph execution error:\n\nDetected at node x defined at:\n"
      ...     '  File "a.py", line 1\n\nlabel 5 out of range\n\t [[{{node x}}]]')
      >>> str(_cause_first(err)).splitlines()[0]
      'label 5 out of range (while running a step; the whole report follows)'
    """
    lines = err.message.splitlines()
    cause = [
        line
        for line in lines
        if line.strip()
        and not line[0].isspace()
        and not line.startswith(("Graph execution error", "Detected at node"))
    ]
    if not lines or not lines[0].startswith("Graph execution error") or not cause:
        return err
    first = " ".join(cause)
    if first.startswith("assertion failed: ["):  # a check of tfpure's: its words, its values
        parts = re.findall(r"\[([^\[\]]*)\]", first.split(" [[{{")[0])
        first = " ".join(p if _NUMBERS.fullmatch(p) is None else f"[{p}]" for p in parts)
    message = f"{first} (while running a step; the whole report follows)\n\n{err.message}"
    return type(err)(err.node_def, err.op, message)


def make_step(
    fn: Callable[[Any, Batch], tuple[Any, dict[str, Any]]],
    *,
    steps_per_call: int | Literal["auto"] = 1,
    jit_compile: bool | Literal["auto"] = False,
    nonfinite: Nonfinite = "raise",
    autograph: bool = True,
) -> Step | AutoStep:
    """Compiles a user-written step body ``fn(states, batch) -> (states, logs)``.

    `states` is a `TrainState` or a dict / tuple / list of them (a GAN's
    generator and discriminator, a student and its EMA teacher); `logs` maps
    names to scalar tensors for this batch. Inside `fn`, update a state with
    ``state = state.apply_gradients(grads)`` (or assign its variables
    directly, as an EMA update does) and return the states. The batch is
    whatever the data yields: it is not checked against any model's inputs.

    The body gets what built-in steps get: one trace per batch structure
    (the batch dimension free), in-graph iteration from `tf.data`,
    `steps_per_call` fusion, XLA, distribution (under a strategy the body
    runs once per replica on its share of the batch; logs and losses are
    contributions that are summed, as Keras losses compute them — see
    `tfpure.distribute.replica_mean` for hand-written means), and the
    non-finite guard: if any log or any gradient given to `apply_gradients`
    is not finite, *no variable of any state changes*, even when an earlier
    update in the same step was finite. The body may update under control
    flow (``if d.step % 5 == 0:``, `tf.cond`, loops; converted by autograph
    as `tf.function` converts it): an update not taken checks nothing, and
    what an update inside a branch wrote is checked with the state's
    variables after the body.

    The loops (`fold`, `evaluate`, `fit_loop`) report each log as its running
    mean over the epoch, weighted by batch size; a `Checkpointer` saves those
    means with the run.

    Args:
      fn: the body.
      steps_per_call: steps fused into one graph call when driven from an
        iterator (by `fold`, `fit_loop`, `run_on_iterator`); ``"auto"``:
        chosen by timing (`tfpure.auto`).
      jit_compile: compile the body with XLA; ``"auto"``: chosen by timing.
      nonfinite: ``"raise"``: `NonFiniteError` naming the failed checks;
        ``"skip"``: the batch is undone and counted in every state's
        `skipped` (and ``logs["skipped"]``); None: no check.
      autograph: convert the body's Python control flow on tensors to graph
        control flow (`tf.autograph`); False traces it as written.

    Returns:
      A `Step` (an `AutoStep` if an option is ``"auto"``).

    Example:
      >>> import keras, numpy as np, tensorflow as tf, tfpure as tp
      >>> keras.utils.set_random_seed(0)
      >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
      >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD(0.1))
      >>> def body(state, batch):
      ...     x, y = batch
      ...     with tf.GradientTape() as tape:
      ...         loss = tf.reduce_mean((state.model(x, training=True) - y) ** 2)
      ...     state = state.apply_gradients(tape.gradient(loss, state.model.trainable_variables))
      ...     return state, {"mse": loss}
      >>> step = tp.make_step(body)
      >>> x = np.ones((4, 2), "float32"); y = np.zeros((4, 1), "float32")
      >>> for _ in range(30):
      ...     step.reset_logs(state)
      ...     state, logs = step(state, (x, y))
      >>> float(logs["mse"]) < 1e-3, int(state.step)
      (True, 30)
    """
    if not callable(fn):
        raise TypeError(f"`fn` must be a callable (states, batch) -> (states, logs); got {fn!r}.")
    if check_auto("jit_compile", jit_compile) | check_auto("steps_per_call", steps_per_call):
        return AutoStep(
            lambda j, k: make_step(
                fn, steps_per_call=k, jit_compile=j, nonfinite=nonfinite, autograph=autograph
            ),
            kind="custom",
            jit_compile=jit_compile,
            steps_per_call=steps_per_call,
        )
    return Step(
        StepSpec(
            "custom",
            jit_compile=jit_compile,
            steps_per_call=steps_per_call,
            nonfinite=nonfinite,
            fn=fn,
            autograph=autograph,
        )
    )


def make_train_step(
    loss: Any,
    *,
    loss_weights: Any = None,
    jit_compile: bool | Literal["auto"] = False,
    steps_per_call: int | Literal["auto"] = 1,
    nonfinite: Nonfinite = "raise",
    grad_transform: GradTransform | Sequence[GradTransform] | None = None,
) -> Step | AutoStep:
    """Returns a compiled training step ``state, logs = step(state, batch)``.

    The step is the tutorial's loop body, compiled: under a `GradientTape` it
    calls ``model(x, training=True)``, adds ``model.losses`` to the loss,
    scales the loss if the optimizer is a `LossScaleOptimizer`, applies the
    gradients and updates `state.metrics` (the `"loss"` tracker weighted by
    batch size, so an epoch's loss is a per-example mean, as in Keras `fit`).

    Args:
      loss: a `keras.losses.Loss` or Keras loss name, a callable
        ``(y_true, y_pred) -> loss``, a list or dict of those per output (as
        `model.compile` takes them), or a full-control callable
        ``(model, batch, training) -> (loss, y_pred)``. In every case tfpure
        adds ``model.losses`` (regularization) to the loss. A model with
        several outputs reports each output's loss as ``{output}_loss``.
      loss_weights: with a per-output loss, the weight of each output's
        loss in the total: a list in output order or a dict by output name
        (a number for a single output), as in `model.compile`.
      jit_compile: compile the step with XLA; ``"auto"``: the first loop
        chooses by timing both on the data's first batches (`tfpure.auto`).
      steps_per_call: steps fused into one graph call when the step is driven
        from an iterator (by `fold`, `fit_loop`, `run_on_iterator`); a plain
        ``step(state, batch)`` call always runs one step. ``"auto"``: chosen
        by timing 1 and 16.
      nonfinite: what a non-finite loss or gradient does. ``"raise"``:
        `NonFiniteError` naming the step and the culprits; ``"skip"``: the
        batch is skipped and counted in ``logs["skipped"]``. Either way no
        model, optimizer or metric variable changes. ``None``: no check, as in
        the hand-written loop (whatever the step computes is applied; a
        failing step may leave BatchNorm statistics moved).
      grad_transform: a callable ``(grads, variables) -> grads`` or a list of
        them, applied in order between the gradient and the optimizer (with a
        `LossScaleOptimizer` they see unscaled gradients).

    Returns:
      A `Step` (an `AutoStep` if an option is ``"auto"``).

    Raises:
      TypeError: `loss` is not a loss.
      ValueError: an option has an invalid value. A per-output `loss` or
        `loss_weights` that names no output of the model raises when the
        step first meets the state, before any variable changes.

    Example:
      >>> import keras, numpy as np, tfpure as tp
      >>> keras.utils.set_random_seed(0)
      >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
      >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD(0.02))
      >>> step = tp.make_train_step(keras.losses.MeanSquaredError())
      >>> x = np.array([[1.0, 2.0], [3.0, 4.0]], "float32"); y = x.sum(1, keepdims=True)
      >>> losses = []
      >>> for _ in range(20):
      ...     state.reset_metrics()  # logs are running means; keep one step's loss
      ...     state, logs = step(state, (x, y))
      ...     losses.append(float(logs["loss"]))
      >>> losses[-1] < losses[0] / 10
      True
    """
    if check_auto("jit_compile", jit_compile) | check_auto("steps_per_call", steps_per_call):
        return AutoStep(
            lambda j, k: make_train_step(
                loss,
                loss_weights=loss_weights,
                jit_compile=j,
                steps_per_call=k,
                nonfinite=nonfinite,
                grad_transform=grad_transform,
            ),
            kind="train",
            jit_compile=jit_compile,
            steps_per_call=steps_per_call,
        )
    model_loss = step_loss(loss, loss_weights)
    return Step(
        StepSpec(
            "train",
            jit_compile=jit_compile,
            steps_per_call=steps_per_call,
            nonfinite=nonfinite,
            grad_transform=grad_transform,
            loss=loss,
            loss_weights=loss_weights,
            model_loss=model_loss,
        )
    )


def make_eval_step(
    loss: Any,
    *,
    loss_weights: Any = None,
    jit_compile: bool | Literal["auto"] = False,
    steps_per_call: int | Literal["auto"] = 1,
) -> Step | AutoStep:
    """Returns a compiled evaluation step ``state, logs = step(state, batch)``.

    It calls ``model(x, training=False)``, computes the loss plus
    ``model.losses`` and updates only `state.eval_metrics`; no model or
    optimizer variable changes.

    Args:
      loss: as for `make_train_step`.
      loss_weights: as for `make_train_step`.
      jit_compile: compile the step with XLA (``"auto"``: chosen by timing).
      steps_per_call: steps fused into one graph call when driven from an
        iterator (by `evaluate` or `fit_loop`; ``"auto"``: chosen by timing).

    Example:
      >>> import keras, numpy as np, tfpure as tp
      >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, use_bias=False)])
      >>> model.set_weights([np.ones((2, 1), "float32")])
      >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())
      >>> step = tp.make_eval_step("mse")
      >>> state, logs = step(state, (np.ones((4, 2), "float32"), np.zeros((4, 1), "float32")))
      >>> float(logs["loss"])  # (1 + 1)^2
      4.0
    """
    if check_auto("jit_compile", jit_compile) | check_auto("steps_per_call", steps_per_call):
        return AutoStep(
            lambda j, k: make_eval_step(
                loss, loss_weights=loss_weights, jit_compile=j, steps_per_call=k
            ),
            kind="eval",
            jit_compile=jit_compile,
            steps_per_call=steps_per_call,
        )
    model_loss = step_loss(loss, loss_weights)
    return Step(
        StepSpec(
            "eval",
            jit_compile=jit_compile,
            steps_per_call=steps_per_call,
            nonfinite=None,
            loss=loss,
            loss_weights=loss_weights,
            model_loss=model_loss,
        )
    )
