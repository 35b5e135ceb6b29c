"""`TrainState`: the handles a training loop threads through its steps.

A `TrainState` is a frozen record of *handles*: the Keras model, the optimizer,
the training and evaluation metrics, a step counter and a seed generator. The
record itself never changes; the variables it points to do, in place, exactly
as in the hand-written loop. Every step returns the state to use afterwards.

Invariants that `create` establishes, so that steps never create variables
while tracing:
  * the optimizer is built on exactly the model's trainable variables (a
    state created with ``optimizer=None`` is not trained: an EMA target, a
    frozen teacher; its variables are still saved, restored and rolled back);
  * `metrics` and `eval_metrics` both hold a `"loss"` tracker and are
    disjoint sets of objects, so evaluation never pollutes training figures.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import keras
import tensorflow as tf

from tfpure.compat import optimizer_built_for, seed_generators
from tfpure.guard import record_gradients
from tfpure.outputs import Route, clone_metric, resolve_metrics

__all__ = ["TrainState", "ema", "leaves", "owned_variables", "variable_groups"]

LOSS = "loss"


def _eval_copies(
    train: dict[str, keras.metrics.Metric], eval_metrics: Any
) -> dict[str, keras.metrics.Metric]:
    """Evaluation metrics by the training metrics' names: copies, or the instances given."""
    if eval_metrics is None:
        evals = {}
        for name, metric in train.items():
            try:
                evals[name] = clone_metric(metric)
            except Exception as err:  # Keras raises many types from from_config.
                raise ValueError(
                    f"Could not make an evaluation copy of metric {name!r} "
                    f"({type(metric).__name__}) from its config: {err}. Pass separate "
                    "instances with TrainState.create(..., eval_metrics={...})."
                ) from err
        return evals
    if isinstance(eval_metrics, keras.metrics.Metric):
        eval_metrics = [eval_metrics]
    if isinstance(eval_metrics, Mapping):
        items = list(eval_metrics.items())
    elif isinstance(eval_metrics, Sequence) and not isinstance(eval_metrics, str):
        items = [(getattr(m, "name", None), m) for m in eval_metrics]
    else:
        raise TypeError(
            "`eval_metrics` must be a dict of name -> keras.metrics.Metric, a list of "
            f"metrics, or None; got {type(eval_metrics).__name__}."
        )
    for name, metric in items:
        if not isinstance(metric, keras.metrics.Metric):
            raise TypeError(
                f"`eval_metrics[{name!r}]` must be a keras.metrics.Metric instance; got "
                f"{type(metric).__name__}."
            )
    evals = dict(items)
    if set(evals) != set(train) or len(evals) != len(items):
        raise ValueError(
            "`eval_metrics` must have the same names as `metrics`; got "
            f"{sorted(n for n, _ in items)} and {sorted(train)}."
        )
    return {name: evals[name] for name in train}


def _check_optimizer_matches(model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
    """Raises if `optimizer` was built for variables other than the model's."""
    built_for = optimizer_built_for(optimizer)
    if not built_for:
        return
    mine = {id(v) for v in model.trainable_variables}
    theirs = {id(v) for v in built_for}
    if mine != theirs:
        missing = [v.path for v in model.trainable_variables if id(v) not in theirs]
        raise ValueError(
            f"The optimizer {optimizer.name!r} was built for other variables than "
            f"this model's trainable variables ({len(theirs)} built, "
            f"{len(mine)} in the model; first missing: {missing[:3]}). Use a fresh "
            "optimizer for each model."
        )


def _derived_seed(seed: int, path: str) -> int:
    digest = hashlib.sha256(f"{seed}/{path}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _counter(name: str) -> tf.Variable:
    return tf.Variable(
        0,
        dtype=tf.int64,
        trainable=False,
        name=name,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
    )


def _strategy_of(model: keras.Model) -> tf.distribute.Strategy | None:
    """The strategy whose scope we are in, checked against where the model lives."""
    if not model.variables:  # nothing to place (a model of no variables, not trained)
        return tf.distribute.get_strategy() if tf.distribute.has_strategy() else None
    first = model.variables[0].value
    if not tf.distribute.has_strategy():
        if isinstance(first, tf.distribute.DistributedValues):
            raise ValueError(
                f"The variables of model {model.name!r} were created under a "
                "tf.distribute strategy: call TrainState.create inside the same "
                "`with strategy.scope():` block."
            )
        return None
    strategy = tf.distribute.get_strategy()
    outside = [
        v.path for v in model.variables if not strategy.extended.variable_created_in_scope(v.value)
    ]
    if outside:
        raise ValueError(
            f"TrainState.create runs under {type(strategy).__name__}, but model "
            f"{model.name!r} or its optimizer was built outside its scope (e.g. "
            f"{outside[:2]}). Create the model, the optimizer and the state inside "
            "`with strategy.scope():`."
        )
    return strategy


@attrs.frozen(eq=False, repr=False)
class TrainState:
    """Frozen handles to everything a training step reads and updates.

    Build one with `TrainState.create`; its fields are the Keras objects the
    steps update in place (there is no copy). `eq` is identity: two states are
    equal only if they are the same object.

    Attributes:
      model: the `keras.Model` being trained.
      optimizer: a built `keras.optimizers.Optimizer` for `model`, or None
        for a state that is not trained (see `create`).
      metrics: training metrics by name, always including the `"loss"` tracker.
      eval_metrics: separate instances of the same metrics for evaluation.
      step: int64 scalar `tf.Variable`: a built-in train step counts each
        batch it runs, skipped ones included (as Keras counts batches); in a
        `make_step` body, `apply_gradients` counts each update, and a batch
        the guard skips or refuses undoes its counts with its updates.
      rng: a `keras.random.SeedGenerator` for randomness in user-written steps,
        e.g. ``keras.random.normal(shape, seed=state.rng)``.
      skipped: int64 scalar `tf.Variable`, the number of steps a
        ``nonfinite="skip"`` train step skipped.
      strategy: the `tf.distribute.Strategy` whose scope `create` ran in, or
        None. Steps and loops then split each batch across its replicas.
      routes: by metric name, the output the metric reads and whether it
        takes sample weights (`tfpure.outputs.Route`); the built-in steps
        follow it for `metrics` and `eval_metrics`. A metric with no route
        reads the whole targets and sample weights.

    Example:
      >>> import keras, tfpure as tp
      >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
      >>> state = tp.TrainState.create(
      ...     model=model,
      ...     optimizer=keras.optimizers.SGD(0.1),
      ...     metrics={"accuracy": keras.metrics.SparseCategoricalAccuracy()},
      ... )
      >>> sorted(state.metrics), sorted(state.eval_metrics)
      (['accuracy', 'loss'], ['accuracy', 'loss'])
      >>> state.metrics["accuracy"] is state.eval_metrics["accuracy"]
      False
      >>> int(state.step), state.optimizer.built
      (0, True)
    """

    model: keras.Model
    optimizer: keras.optimizers.Optimizer | None
    metrics: Mapping[str, keras.metrics.Metric]
    eval_metrics: Mapping[str, keras.metrics.Metric]
    step: tf.Variable
    rng: keras.random.SeedGenerator
    skipped: tf.Variable
    strategy: tf.distribute.Strategy | None = None
    routes: Mapping[str, Route] = attrs.field(factory=dict)

    @classmethod
    def create(
        cls,
        *,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer | None,
        metrics: Any = None,
        weighted_metrics: Any = None,
        eval_metrics: Mapping[str, keras.metrics.Metric]
        | Sequence[keras.metrics.Metric]
        | None = None,
        seed: int | None = None,
    ) -> TrainState:
        """Checks the pieces, builds the optimizer and returns a new state.

        Args:
          model: a built Keras 3 model (with an optimizer, it must own
            trainable variables).
          optimizer: a Keras optimizer, unbuilt or built for exactly `model`'s
            trainable variables. `create` builds it, so no step creates
            variables while tracing. None: a state that is not trained (a
            target network updated by `tp.ema`, a frozen teacher): a
            `make_step` body reads and updates it, the guard checks and rolls
            back its variables and a `Checkpointer` saves them, but
            `apply_gradients` and `make_train_step` refuse it.
          metrics: training metrics as `model.compile` takes them: Metric
            instances, names (``"accuracy"``, ``"mae"``), functions
            ``(y_true, y_pred)``, a list, or a dict by output name (one
            entry or list per output) -- or tfpure's dict of name -> metric.
            They ignore sample weights, as in Keras. A `"loss"` tracker
            (`keras.metrics.Mean`) is added. Names are Keras' (``"b_mae"``
            for output ``b``); see `tfpure.outputs`.
          weighted_metrics: likewise, metrics that take the batch's sample
            weights.
          eval_metrics: evaluation metrics with the same names; by default,
            fresh copies of the training metrics.
          seed: if given, reseeds every `SeedGenerator` in `model` (Dropout's
            masks, for instance) and `rng` deterministically from it, so
            two runs with the same seed draw the same randomness.

        Returns:
          A `TrainState` with `step == 0`.

        Raises:
          TypeError: `model`, `optimizer` or a metric has the wrong type.
          ValueError: the model has no trainable variables for its optimizer,
            the optimizer was built for another model, metric names clash, or a per-output
            structure names no output of the model.

        Example:
          >>> import keras, tfpure as tp
          >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
          >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.Adam())
          >>> len(state.optimizer.variables)  # iterations, learning rate, 2 x 2 slots
          6
          >>> target = tp.TrainState.create(model=keras.models.clone_model(model), optimizer=None)
          >>> target.optimizer is None, len(variable_groups(target)["model"])
          (True, 2)
        """
        if not isinstance(model, keras.Model):
            raise TypeError(f"`model` must be a keras.Model; got {type(model).__name__}.")
        if optimizer is not None and not isinstance(optimizer, keras.optimizers.Optimizer):
            raise TypeError(
                "`optimizer` must be a keras.optimizers.Optimizer instance (or None for a "
                f"state that is not trained); got {type(optimizer).__name__}."
            )
        if not model.built:
            raise ValueError(
                f"`model` {model.name!r} is not built: give it a keras.Input or call "
                "model.build(shape)."
            )
        if optimizer is not None and not model.trainable_variables:
            raise ValueError(
                f"`model` {model.name!r} has no trainable variables (all its layers are "
                "frozen, trainable=False) for its optimizer to train. For a state that is "
                "not trained, pass optimizer=None."
            )
        train, routes = resolve_metrics(model, metrics, weighted_metrics)
        evals = _eval_copies(train, eval_metrics)
        shared = {n for n in train if train[n] is evals[n]}
        if shared:
            raise ValueError(
                f"`metrics` and `eval_metrics` share the instances {sorted(shared)}; "
                "evaluation would overwrite training figures. Pass separate objects."
            )
        strategy = _strategy_of(model)
        if optimizer is not None and optimizer.built:
            _check_optimizer_matches(model, optimizer)
        elif optimizer is not None:
            optimizer.build(model.trainable_variables)

        rng = keras.random.SeedGenerator(seed)
        if seed is not None:
            for i, generator in enumerate(seed_generators(model)):
                generator.state.assign(tf.constant([_derived_seed(seed, str(i)), 0], tf.int64))
        return cls(
            model=model,
            optimizer=optimizer,
            metrics={LOSS: keras.metrics.Mean(name=LOSS), **train},
            eval_metrics={LOSS: keras.metrics.Mean(name=LOSS), **evals},
            step=_counter("step"),
            rng=rng,
            skipped=_counter("skipped"),
            strategy=strategy,
            routes=routes,
        )

    def apply_gradients(self, grads: Sequence[Any]) -> TrainState:
        """One optimizer update of `model.trainable_variables`; returns the state.

        `grads` holds one gradient per trainable variable, in
        `model.trainable_variables` order (None for a variable the loss does
        not reach). Counts `state.step`. Use it inside a step body compiled by
        `tp.make_step`, where the non-finite guard checks these gradients;
        it also works eagerly. With a `LossScaleOptimizer`, differentiate
        ``state.optimizer.scale_loss(loss)``: the optimizer unscales the
        gradients and skips overflowing steps itself, as in `make_train_step`
        (for other optimizers `scale_loss` returns the loss unchanged).

        Raises:
          ValueError: `grads` has another length than the trainable
            variables, or holds only None; or the state has no optimizer.

        Example:
          >>> import keras, numpy as np, tensorflow as tf, tfpure as tp
          >>> model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False)])
          >>> model.set_weights([np.ones((1, 1), "float32")])
          >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD(0.5))
          >>> with tf.GradientTape() as tape:
          ...     loss = tf.reduce_sum(model(tf.ones((1, 1))) ** 2)  # d/dw w^2 = 2 at w = 1
          >>> state = state.apply_gradients(tape.gradient(loss, model.trainable_variables))
          >>> float(model.weights[0][0, 0]), int(state.step)
          (0.0, 1)
        """
        if self.optimizer is None:
            raise ValueError(
                f"apply_gradients on the state of model {self.model.name!r}, which has no "
                "optimizer (TrainState.create(..., optimizer=None)): it is not trained. "
                "Update its variables directly (e.g. tp.ema(target, online, decay)), or "
                "create it with an optimizer."
            )
        variables = self.model.trainable_variables
        grads = list(grads)
        if len(grads) != len(variables):
            raise ValueError(
                f"apply_gradients got {len(grads)} gradients for the {len(variables)} "
                f"trainable variables of model {self.model.name!r}: pass one per variable, "
                "in model.trainable_variables order (None where there is none)."
            )
        pairs = [(g, v) for g, v in zip(grads, variables, strict=True) if g is not None]
        if not pairs:
            raise ValueError(
                f"apply_gradients got no gradient for model {self.model.name!r} (all None): "
                "the loss does not depend on its weights."
            )
        record_gradients(
            self.model,
            grads,
            loss_scaled=isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer),
        )
        self.optimizer.apply_gradients(pairs)
        self.step.assign_add(1)
        return self

    def replace(self, **changes: Any) -> TrainState:
        """Returns a copy with `changes` applied to the named fields.

        The copy shares every handle it does not replace. Steps compile per
        state, so the first step on the copy traces anew.

        Example:
          >>> import keras, tfpure as tp
          >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
          >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())
          >>> other = state.replace(rng=keras.random.SeedGenerator(7))
          >>> other.model is state.model, other.rng is state.rng
          (True, False)
        """
        return attrs.evolve(self, **changes)

    def reset_metrics(self) -> None:
        """Resets the training metrics (the loss tracker included) to empty.

        Example:
          >>> import keras, tfpure as tp
          >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
          >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())
          >>> state.metrics["loss"].update_state(3.0)
          >>> state.reset_metrics()
          >>> float(state.metrics["loss"].result())
          0.0
        """
        for metric in self.metrics.values():
            metric.reset_state()

    def reset_eval_metrics(self) -> None:
        """Resets the evaluation metrics (the loss tracker included) to empty.

        Example:
          >>> import keras, tfpure as tp
          >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
          >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())
          >>> state.eval_metrics["loss"].update_state(3.0)
          >>> state.reset_eval_metrics()
          >>> float(state.eval_metrics["loss"].result())
          0.0
        """
        for metric in self.eval_metrics.values():
            metric.reset_state()

    def __repr__(self) -> str:
        return (
            f"TrainState(model={self.model.name!r}, "
            f"optimizer={type(self.optimizer).__name__ if self.optimizer is not None else None}, "
            f"metrics={sorted(self.metrics)}, step={int(self.step.numpy())})"
        )


def _flatten(node: Any) -> list[Any]:
    # tf.nest would open a TrainState (an attrs class): walk dicts, lists and tuples only.
    if isinstance(node, dict):
        return [leaf for key in sorted(node) for leaf in _flatten(node[key])]
    if isinstance(node, list | tuple):
        return [leaf for item in node for leaf in _flatten(item)]
    return [node]


def rebuild(template: Any, states: list[Any]) -> Any:
    """A structure like `template` (dicts, lists, tuples) with `states` as its leaves, in
    `leaves` order.

    Example:
      >>> from tfpure.state import rebuild
      >>> rebuild({"b": 0, "a": (0, 0)}, ["x", "y", "z"])
      {'b': 'z', 'a': ('x', 'y')}
    """
    it = iter(states)

    def build(node: Any) -> Any:
        if isinstance(node, dict):
            built = {key: build(node[key]) for key in sorted(node)}
            return {key: built[key] for key in node}
        if isinstance(node, list | tuple):
            items = [build(item) for item in node]
            return type(node)(*items) if hasattr(node, "_fields") else type(node)(items)
        return next(it)

    return build(template)


def key_paths(states: Any) -> list[tuple[Any, ...]]:
    """The keys leading to each state of a structure, in `leaves` order (() for one state).

    Example:
      >>> from tfpure.state import key_paths
      >>> key_paths({"g": 0, "d": [0, 0]})
      [('d', 0), ('d', 1), ('g',)]
    """
    if isinstance(states, dict):
        return [(key, *path) for key in sorted(states) for path in key_paths(states[key])]
    if isinstance(states, list | tuple):
        return [(i, *path) for i, item in enumerate(states) for path in key_paths(item)]
    return [()]


def labels(states: Any) -> list[str]:
    """How messages name each state of a structure, in `leaves` order: ``states['d']``.

    Example:
      >>> from tfpure.state import labels
      >>> labels({"g": 0, "d": [0, 0]})
      ["states['d'][0]", "states['d'][1]", "states['g']"]
    """
    return [
        "states" + "".join(f"[{key!r}]" for key in path) if path else "state"
        for path in key_paths(states)
    ]


def structure_difference(given: Any, returned: Any, root: str = "states") -> str:
    """What differs between two state structures (the first difference found), or "".

    Example:
      >>> from tfpure.state import structure_difference
      >>> structure_difference({"g": 0, "d": 0}, {"g": 0, "e": 0})
      "states['d'] is missing, states['e'] is extra"
    """
    if isinstance(given, dict):
        if not isinstance(returned, dict):
            return (
                f"{root} should be a dict with keys {sorted(given)}, got {type(returned).__name__}"
            )
        missing = [f"{root}[{k!r}] is missing" for k in sorted(set(given) - set(returned))]
        extra = [f"{root}[{k!r}] is extra" for k in sorted(set(returned) - set(given))]
        if missing or extra:
            return ", ".join(missing + extra)
        inner = (structure_difference(given[k], returned[k], f"{root}[{k!r}]") for k in given)
        return next((d for d in inner if d), "")
    if isinstance(given, list | tuple):
        if not isinstance(returned, list | tuple) or len(returned) != len(given):
            size = f" of {len(returned)}" if isinstance(returned, list | tuple) else ""
            return f"{root} should be a {type(given).__name__} of {len(given)}, got " + (
                f"{type(returned).__name__}{size}"
            )
        inner = (
            structure_difference(a, b, f"{root}[{i}]")
            for i, (a, b) in enumerate(zip(given, returned, strict=True))
        )
        return next((d for d in inner if d), "")
    if isinstance(returned, dict | list | tuple):
        return f"{root} should be a state, got a {type(returned).__name__}"
    return ""


def leaves(states: Any) -> list[TrainState]:
    """The `TrainState`s of a state structure (a state, or a dict / tuple / list of them).

    Raises:
      TypeError: a leaf is not a `TrainState`, or there is none.

    Example:
      >>> import keras, tfpure as tp
      >>> from tfpure.state import leaves
      >>> make = lambda: tp.TrainState.create(
      ...     model=keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]),
      ...     optimizer=keras.optimizers.SGD())
      >>> len(leaves({"g": make(), "d": make()}))
      2
    """
    found = _flatten(states)
    bad = [type(leaf).__name__ for leaf in found if not isinstance(leaf, TrainState)]
    if bad or not found:
        raise TypeError(
            "Expected a TrainState or a dict / tuple / list of TrainStates; got "
            f"{type(states).__name__}{f' holding {bad}' if bad else ''}. Build states with "
            "tp.TrainState.create(model=..., optimizer=...)."
        )
    return found


def variable_groups(state: TrainState) -> dict[str, list[Any]]:
    """Every variable a state owns, by group, in a fixed order.

    Example:
      >>> import keras, tfpure as tp
      >>> from tfpure.state import variable_groups
      >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
      >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())
      >>> {group: len(vs) for group, vs in variable_groups(state).items()}
      {'model': 2, 'optimizer': 2, 'metrics': 2, 'eval_metrics': 2, 'counters': 3}
    """
    return {
        "model": list(state.model.variables),
        "optimizer": list(state.optimizer.variables) if state.optimizer is not None else [],
        "metrics": [v for m in state.metrics.values() for v in m.variables],
        "eval_metrics": [v for m in state.eval_metrics.values() for v in m.variables],
        "counters": [state.step, state.skipped, state.rng.state],
    }


def owned_variables(state: TrainState) -> list[Any]:
    """Every variable a state owns, in `variable_groups` order."""
    return [v for vs in variable_groups(state).values() for v in vs]


def _model_of(state: TrainState | keras.Model) -> keras.Model:
    model = state.model if isinstance(state, TrainState) else state
    if not isinstance(model, keras.Model):
        raise TypeError(f"tp.ema takes TrainStates or keras.Models; got {type(state).__name__}.")
    return model


def ema(target: Any, source: Any, decay: Any) -> Any:
    """Moves `target`'s weights towards `source`'s: ``t = decay * t + (1 - decay) * s``.

    The exponential moving average of BYOL's and MoCo's target networks, a mean
    teacher or an EMA of weights, written once. It averages each variable of
    `target` whose counterpart in `source` (same position in
    `model.variables`) is trainable, as Keras' optimizers average with
    ``use_ema``; the others (BatchNorm statistics, seed generators) are left
    as they are. Use it inside a `tp.make_step` body on a target created with
    ``optimizer=None``: the guard then checks and rolls back the target with
    the other states, and a `Checkpointer` saves it.

    Args:
      target: the `TrainState` (or `keras.Model`) updated in place.
      source: the `TrainState` (or `keras.Model`) it follows, of the same
        architecture.
      decay: the share of the target kept, in [0, 1] (a float or a scalar tensor).

    Returns:
      `target`.

    Raises:
      TypeError: an argument is neither a `TrainState` nor a `keras.Model`.
      ValueError: the two models' variables differ in number or shape, or a
        Python `decay` is outside [0, 1].

    Example:
      >>> import keras, numpy as np, tfpure as tp
      >>> online = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
      >>> online.set_weights([np.full((1, 1), 2.0, "float32"), np.zeros(1, "float32")])
      >>> target = tp.TrainState.create(model=keras.models.clone_model(online), optimizer=None)
      >>> target.model.set_weights([np.ones((1, 1), "float32"), np.ones(1, "float32")])
      >>> target = tp.ema(target, online, 0.75)
      >>> [float(w.ravel()[0]) for w in target.model.get_weights()]  # .75 * 1 + .25 * 2, ...
      [1.25, 0.75]
    """
    mine, theirs = _model_of(target).variables, _model_of(source).variables
    shapes = [tuple(v.shape) for v in mine], [tuple(v.shape) for v in theirs]
    if shapes[0] != shapes[1]:
        raise ValueError(
            "tp.ema needs two models of the same architecture: the target's "
            f"variables have the shapes {shapes[0]}, the source's {shapes[1]}."
        )
    if isinstance(decay, int | float) and not 0 <= decay <= 1:
        raise ValueError(f"tp.ema's decay must be in [0, 1]; got {decay}.")
    for t, s in zip(mine, theirs, strict=True):
        if s.trainable:  # (a Python decay as written by hand: decay * t + (1.0 - decay) * s)
            kept = decay if isinstance(decay, int | float) else tf.cast(decay, t.dtype)
            t.assign(kept * t + (1 - kept) * s)
    return target
