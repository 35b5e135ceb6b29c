"""`StepSpec`: the frozen, checked options of a step, read by every part of the engine.

`make_step`, `make_train_step` and `make_eval_step` check their options once
and keep them here (``step.spec``); the engine (`tfpure.graph`) and the
bodies (`tfpure.builtin`, `tfpure.custom`) read them, never the factories'
arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

import attrs
import tensorflow as tf

from tfpure.types import check_count

__all__ = ["GradTransform", "Nonfinite", "StepSpec"]

Nonfinite = Literal["raise", "skip"] | None


class GradTransform(Protocol):
    """Maps gradients to new gradients: ``grads = fn(grads, variables)``.

    Example:
      >>> import keras, numpy as np, tfpure as tp
      >>> def halve(grads, variables):
      ...     return [None if g is None else g / 2 for g in grads]
      >>> step = tp.make_train_step("mse", grad_transform=halve)
      >>> step.spec.grad_transform is not None
      True
    """

    def __call__(
        self, grads: list[tf.Tensor | None], variables: list[Any], /
    ) -> list[tf.Tensor | None]: ...


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False; got {value!r}.")
    return value


def _check_jit_compile(value: Any) -> bool:
    return _check_bool("jit_compile", value)


def _check_steps_per_call(value: Any) -> int:
    return check_count("steps_per_call", value, meaning=" (steps fused in one graph call)")


def _check_nonfinite(value: Any) -> Nonfinite:
    if value not in ("raise", "skip", None):
        raise ValueError(f"`nonfinite` must be 'raise', 'skip' or None; got {value!r}.")
    return value


def _chain(
    transforms: GradTransform | Sequence[GradTransform] | None,
) -> GradTransform | None:
    if transforms is None:
        return None
    if callable(transforms):
        return transforms
    transforms = list(transforms)
    for t in transforms:
        if not callable(t):
            raise TypeError(
                "`grad_transform` must be a callable (grads, variables) -> grads "
                f"or a list of them; got {t!r}."
            )

    def chained(grads: list[Any], variables: list[Any]) -> list[Any]:
        for t in transforms:
            grads = list(t(grads, variables))
        return grads

    return chained


@attrs.frozen
class StepSpec:
    """The options of a step, checked once; every engine of the step reads them.

    Attributes:
      kind: ``"train"``, ``"eval"`` (built-in bodies) or ``"custom"`` (`make_step`).
      jit_compile: the body runs under XLA.
      steps_per_call: steps fused into one graph call when driven from an iterator.
      nonfinite: ``"raise"``, ``"skip"`` or None (no guard).
      grad_transform: built-in train steps: ``(grads, variables) -> grads``.
      loss: built-in steps: the loss as given; `model_loss` its full-control form
        (or an `OutputLoss`, bound to each model the step meets).
      loss_weights: built-in steps: the per-output loss weights as given, or None.
      fn: custom steps: the body ``fn(states, batch) -> (states, logs)``.
      autograph: custom steps: the body's Python control flow on tensors
        (``if``, ``for``, ``while``) is converted to graph control flow, as
        `tf.function` converts it by default.

    Example:
      >>> import tfpure as tp
      >>> tp.make_train_step("mse", steps_per_call=4).spec.steps_per_call
      4
    """

    kind: Literal["train", "eval", "custom"]
    jit_compile: bool = attrs.field(default=False, converter=_check_jit_compile)
    steps_per_call: int = attrs.field(default=1, converter=_check_steps_per_call)
    nonfinite: Nonfinite = attrs.field(default="raise", converter=_check_nonfinite)
    grad_transform: GradTransform | None = attrs.field(default=None, converter=_chain)
    loss: Any = None
    loss_weights: Any = None
    model_loss: Any = None
    fn: Callable[..., Any] | None = None
    autograph: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
