"""Property assertions about one model or one step: call them on your own code.

Each assertion raises `AssertionError` saying what differed and where (which
variable, which output, by how much), and leaves the objects it was given as
it found them unless the check itself is about changing them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfpure.batch import as_model_loss, unpack
from tfpure.compat import (
    flatten_layers,
    is_functional,
    keras_losses_in_float64,
    seed_generators,
)
from tfpure.state import TrainState

__all__ = [
    "assert_eval_step_pure",
    "assert_gradients_match_numeric",
    "assert_training_flag_respected",
    "snapshot",
    "state_variables",
]

_DROPOUT_LIKE = (
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D,
    keras.layers.GaussianDropout,
    keras.layers.GaussianNoise,
    keras.layers.AlphaDropout,
)


def snapshot(variables: Iterable[Any]) -> dict[str, np.ndarray]:
    """Copies variables to NumPy, keyed by path (or name), for later comparison.

    Example:
      >>> import keras
      >>> from tfpure.testing import snapshot
      >>> layer = keras.layers.Dense(2, name="head"); layer.build((None, 3))
      >>> {name: value.shape for name, value in snapshot(layer.variables).items()}
      {'head/kernel': (3, 2), 'head/bias': (2,)}
    """
    out: dict[str, np.ndarray] = {}
    for i, v in enumerate(variables):
        name = getattr(v, "path", None) or getattr(v, "name", None) or f"variable_{i}"
        if name in out:
            name = f"{name}#{i}"
        out[name] = np.array(v.numpy(), copy=True)
    return out


def state_variables(state: TrainState) -> dict[str, list[Any]]:
    """A state's variables by group: model, optimizer, training metrics, counters.

    Example:
      >>> import keras, tfpure as tp
      >>> from tfpure import testing as tpt
      >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
      >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())
      >>> {group: len(vs) for group, vs in tpt.state_variables(state).items()}
      {'model': 2, 'optimizer': 2, 'metrics': 2, 'counters': 2}
    """
    return {
        "model": list(state.model.variables),
        "optimizer": list(state.optimizer.variables) if state.optimizer is not None else [],
        "metrics": [v for m in state.metrics.values() for v in m.variables],
        "counters": [state.step, state.skipped],
    }


def _state_groups(states: Any) -> dict[str, list[Any]]:
    """`state_variables` of a state, or of several (a dict, tuple or list of states).

    Several states' groups are keyed ``"<key> <group>"``.

    """
    if isinstance(states, TrainState):
        return state_variables(states)
    items = states.items() if isinstance(states, Mapping) else enumerate(states)
    return {f"{key} {group}": vs for key, s in items for group, vs in state_variables(s).items()}


def _diff(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> list[str]:
    changed = []
    for name, old in before.items():
        new = after[name]
        if old.shape != new.shape or not np.array_equal(old, new, equal_nan=old.dtype.kind == "f"):
            delta = (
                float(np.max(np.abs(new.astype("float64") - old.astype("float64"))))
                if old.shape == new.shape
                else float("nan")
            )
            changed.append(f"{name} (max |change| {delta:.3g})")
    return changed


def _restore(variables: Sequence[Any], values: dict[str, np.ndarray]) -> None:
    for v, value in zip(variables, values.values(), strict=True):
        v.assign(value)


def assert_eval_step_pure(eval_step: Callable[..., Any], state: Any, batch: Any) -> None:
    """Asserts that `eval_step` changes no model, optimizer or training-metric variable.

    Only `state.eval_metrics` may change (they are the step's output).
    `state` may be several states (a dict, tuple or list), for a `make_step`
    body used to evaluate them.

    Raises:
      AssertionError: naming each variable that changed and by how much.

    Example:
      >>> import keras, numpy as np, tfpure as tp
      >>> from tfpure import testing as tpt
      >>> model = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization()])
      >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())
      >>> batch = (np.ones((4, 3), "float32"), np.zeros((4, 3), "float32"))
      >>> tpt.assert_eval_step_pure(tp.make_eval_step("mse"), state, batch)
    """
    groups = _state_groups(state)
    before = {g: snapshot(vs) for g, vs in groups.items()}
    eval_step(state, batch)
    changed = [
        f"{group}: {item}"
        for group, vs in groups.items()
        for item in _diff(before[group], snapshot(vs))
    ]
    if changed:
        raise AssertionError(
            "The eval step changed variables it must not touch (only "
            "state.eval_metrics may change):\n  " + "\n  ".join(changed)
        )


@contextlib.contextmanager
def _spying(layers: Sequence[keras.layers.Layer]) -> Iterator[dict[str, tuple]]:
    """Records each layer's first input and output (as NumPy) while the context lasts."""
    seen: dict[str, tuple] = {}
    patched = []
    for layer in layers:
        call = layer.call
        patched.append((layer, "call" in vars(layer), call))

        def spy(*args: Any, _call: Any = call, _name: str = layer.name, **kwargs: Any) -> Any:
            out = _call(*args, **kwargs)
            seen[_name] = (keras.ops.convert_to_numpy(args[0]), keras.ops.convert_to_numpy(out))
            return out

        layer.call = spy
    try:
        yield seen
    finally:
        for layer, own, call in patched:
            if own:
                layer.call = call
            else:
                del layer.call  # the class's method again


def _layers(model: keras.Model) -> list[keras.layers.Layer]:
    return flatten_layers(model, include_self=False)


def assert_training_flag_respected(model: keras.Model, batch: Any) -> None:
    """Asserts that the model honours ``training=``.

    * ``training=False`` gives identical outputs on two calls and changes no
      variable (no BatchNorm statistic, no Dropout seed);
    * ``training=True`` draws new masks where the model has Dropout-like
      layers (two calls differ, and no such layer passes its input through
      unchanged) and moves the moving statistics of every
      BatchNormalization layer. Layer by layer: a deaf Dropout among
      working ones is named.

    The model's variables are restored afterwards.

    Raises:
      AssertionError: saying which promise broke.

    Example:
      >>> import keras, numpy as np
      >>> from tfpure import testing as tpt
      >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
      ...                           keras.layers.Dropout(0.5), keras.layers.BatchNormalization()])
      >>> tpt.assert_training_flag_respected(model, np.ones((16, 4), "float32"))
    """
    x, _, _ = unpack(batch)
    variables = list(model.variables)
    original = snapshot(variables)
    try:
        first = keras.ops.convert_to_numpy(model(x, training=False))
        second = keras.ops.convert_to_numpy(model(x, training=False))
        if not np.array_equal(first, second, equal_nan=True):
            raise AssertionError(
                "training=False is not deterministic: two calls on the same batch "
                f"differ by up to {np.nanmax(np.abs(first - second)):.3g}. A layer "
                "draws randomness (or keeps state) outside training."
            )
        changed = _diff(original, snapshot(variables))
        if changed:
            raise AssertionError("training=False changed variables:\n  " + "\n  ".join(changed))
        layers = _layers(model)
        _assert_masks_drawn(model, layers, x)
        _assert_statistics_move(model, layers, x)
    finally:
        _restore(variables, original)


def _assert_masks_drawn(model: keras.Model, layers: list[Any], x: Any) -> None:
    """``training=True`` draws new masks in every Dropout-like layer (if any)."""
    # Enough examples that two independent Dropout masks cannot coincide.
    wide = tf.nest.map_structure(lambda t: np.concatenate([np.asarray(t)] * 64), x)
    droppers = [
        layer
        for layer in layers
        if isinstance(layer, _DROPOUT_LIKE) and getattr(layer, "rate", 1) > 0
    ]
    if not droppers:
        return
    with _spying(droppers) as seen:
        a = keras.ops.convert_to_numpy(model(wide, training=True))
    deaf = [
        layer.name for layer in droppers if layer.name in seen and np.array_equal(*seen[layer.name])
    ]
    if deaf:
        raise AssertionError(
            f"training=True: {deaf} passed their inputs through unchanged (each "
            "ignores training=True), while the model has "
            f"{[layer.name for layer in droppers]} to draw masks."
        )
    b = keras.ops.convert_to_numpy(model(wide, training=True))
    if np.array_equal(a, b):
        raise AssertionError(
            "training=True gave identical outputs on two calls although the "
            "model has Dropout-like layers: masks are not drawn anew (a "
            "layer ignores training=True, or its seed does not advance)."
        )


def _assert_statistics_move(model: keras.Model, layers: list[Any], x: Any) -> None:
    """``training=True`` moves the statistics of every BatchNormalization layer (if any)."""
    norms = [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
    if not norms:
        return
    stats = [v for n in norms for v in (n.moving_mean, n.moving_variance)]
    before = snapshot(stats)
    model(x, training=True)
    after = snapshot(stats)
    stuck = [
        n.name
        for n in norms
        if not _diff({k: before[k] for k in snapshot([n.moving_mean, n.moving_variance])}, after)
    ]
    if stuck:
        raise AssertionError(
            f"training=True left the BatchNormalization moving statistics of {stuck} "
            f"unchanged (of {[n.name for n in norms]}): not in training mode."
        )


@contextlib.contextmanager
def _default_dtype(dtype: str) -> Iterator[None]:
    """Layers made without a dtype compute in `dtype` while the context lasts."""
    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx(dtype)
    keras.config.set_dtype_policy(dtype)
    try:
        yield
    finally:
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(policy)


def _float64_copy(model: keras.Model) -> keras.Model:
    """A float64 twin of `model`: its layers (and the sublayers they build) in float64."""

    def clone(operation: Any) -> Any:
        config = operation.get_config()
        if isinstance(operation, keras.layers.Layer):  # not an op like `x + h`, `NotEqual`
            config["dtype"] = "float64"
        return operation.__class__.from_config(config)

    try:
        # Sublayers a custom layer makes without a dtype are float64 too.
        with _default_dtype("float64"):
            if isinstance(model, keras.Sequential) or is_functional(model):
                copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
            else:  # a subclassed model: rebuilt from its config
                copy = keras.models.clone_model(model)
            if not copy.built:
                copy.build_from_config(model.get_build_config())
    except Exception as err:
        raise TypeError(
            "assert_gradients_match_numeric needs a model keras.models.clone_model "
            f"can rebuild in float64 (Sequential, functional, or with get_config): {err}"
        ) from err
    if len(copy.variables) != len(model.variables):
        raise TypeError(
            f"The float64 copy of {model.name!r} has {len(copy.variables)} variables, the "
            f"model {len(model.variables)}: a layer builds differently from its config."
        )
    for src, dst in zip(model.variables, copy.variables, strict=True):
        dst.assign(tf.cast(src.value, dst.dtype))
    for layer in flatten_layers(copy):  # state computed from variables: adapted Normalization
        if isinstance(layer, keras.layers.Normalization) and hasattr(layer, "adapt_mean"):
            layer.finalize_state()
    return copy


def _float64(structure: Any) -> Any:
    """`structure` with its floating leaves cast to float64 (integers kept)."""
    return tf.nest.map_structure(
        lambda t: tf.cast(t, tf.float64) if tf.as_dtype(np.asarray(t).dtype).is_floating else t,
        structure,
    )


def _check_copy(model: keras.Model, copy: keras.Model, x: Any) -> None:
    """Refuses a float64 copy that does not compute the original's function."""
    want = tf.nest.flatten(model(x, training=False))
    got = tf.nest.flatten(copy(_float64(x), training=False))
    for a, b in zip(want, got, strict=True):
        a, b = np.asarray(a, "float64"), np.asarray(b, "float64")
        gap = float(np.max(np.abs(a - b), initial=0.0))
        if not np.allclose(b, a, rtol=1e-3, atol=1e-4):
            raise AssertionError(
                f"The float64 copy of {model.name!r} does not compute the model's outputs "
                f"(largest difference {gap:.3g}): a layer's state was not copied (a layer "
                "with state outside its variables, or one built unlike its config). "
                "Checking its gradients would check another function."
            )


def assert_gradients_match_numeric(
    model: keras.Model,
    loss: Any,
    batch: Any,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-6,
    eps: float = 1e-6,
    max_entries: int = 12,
    seed: int = 0,
    training: bool = False,
) -> None:
    """Asserts that tape gradients equal central finite differences, in float64.

    The loss is ``loss(y, model(x, training=False))`` plus ``model.losses``, as
    in a training step (``training=False`` makes it deterministic). The model is
    copied to float64 (`keras.models.clone_model`, nested sublayers, an adapted
    `Normalization`'s statistics and non-layer ops such as ``x + h``
    included), so `model` is not touched; a copy that does not reproduce the
    model's outputs on the batch is refused (its gradients would be another
    function's). The loss computes in float64 whatever its form: `keras.losses`
    objects called inside a full-control loss too. Sparse gradients (an
    `Embedding`'s) are compared dense. At most `max_entries` entries per
    variable, chosen by `seed`, are probed.

    Args:
      model: a Keras model `clone_model` can rebuild.
      loss: a loss as `make_train_step` accepts it.
      batch: ``(x, y)`` or ``(x, y, sample_weight)``.
      rtol, atol: tolerance of ``|tape - numeric| <= atol + rtol * |numeric|``.
      eps: the finite-difference step.
      training: check the ``training=True`` path instead: Dropout draws the
        same masks at every evaluation (each seed generator's state is put
        back first), BatchNorm normalises by the batch's statistics.

    Raises:
      AssertionError: naming the variable, the entry and both values; or
        saying the float64 copy computes other outputs.

    Example:
      >>> import keras, numpy as np
      >>> from tfpure import testing as tpt
      >>> keras.utils.set_random_seed(0)
      >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, "tanh"),
      ...                           keras.layers.Dense(2)])
      >>> x = np.random.default_rng(0).normal(size=(5, 3)).astype("float32")
      >>> y = np.array([0, 1, 1, 0, 1], "int32")
      >>> loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
      >>> tpt.assert_gradients_match_numeric(model, loss, (x, y))
    """
    copy = _float64_copy(model)
    _check_copy(model, copy, unpack(batch)[0])
    model_loss = as_model_loss(loss, dtype="float64")
    batch = _float64(batch)
    # training=True: every evaluation draws the same Dropout masks (seed states put back).
    seeds = [g.state for g in seed_generators(copy)] if training else []
    held = [s.numpy() for s in seeds]

    def total() -> tf.Tensor:
        for state, value in zip(seeds, held, strict=True):
            state.assign(value)
        with keras_losses_in_float64():
            value, _ = model_loss(copy, batch, training)
        extra = copy.losses
        return tf.cast(value, tf.float64) + (tf.add_n(extra) if extra else 0.0)

    with tf.GradientTape() as tape:
        value = total()
    grads = tape.gradient(value, copy.trainable_variables)
    probe_loss = tf.function(total)  # one trace for every probe below
    rng = np.random.default_rng(seed)
    failures = []
    for var, grad in zip(copy.trainable_variables, grads, strict=True):
        tape_grad = np.zeros(var.shape) if grad is None else tf.convert_to_tensor(grad).numpy()
        flat = var.numpy().reshape(-1)
        picks = rng.choice(flat.size, size=min(max_entries, flat.size), replace=False)
        for index in picks:
            original = flat[index]
            numeric = []
            for sign in (1.0, -1.0):
                probe = flat.copy()
                probe[index] = original + sign * eps
                var.assign(probe.reshape(var.shape))
                numeric.append(float(probe_loss()))
            var.assign(flat.reshape(var.shape))
            fd = (numeric[0] - numeric[1]) / (2 * eps)
            got = float(tape_grad.reshape(-1)[index])
            if abs(got - fd) > atol + rtol * abs(fd):
                position = np.unravel_index(index, var.shape)
                failures.append(
                    f"{var.path}{list(map(int, position))}: tape {got:.6g}, "
                    f"finite differences {fd:.6g}"
                )
    if failures:
        raise AssertionError(
            f"Tape gradients differ from central finite differences (eps={eps}, "
            f"rtol={rtol}, atol={atol}):\n  " + "\n  ".join(failures[:10])
        )
