"""The batch signatures a step traces: the batch size left free, sizes that vary widened.

`Step.__call__` traces a signature with the batch dimension left free, so
every batch size (a ragged last batch included) runs the same graph; a later
batch whose other sizes differ (a sequence length) widens its structure's
signature there, as ``reduce_retracing`` would, but never where the model's
declared inputs fix a size (so the feature checks still see real sizes).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from tfpure.batch import unpack
from tfpure.compat import is_composite, model_input_structure

__all__ = ["Signatures", "relaxed"]


def relaxed(batch: Any) -> Any:
    """The batch's signature with the batch dimension left free.

    Example:
      >>> import numpy as np
      >>> from tfpure.signature import relaxed
      >>> [spec.shape for spec in relaxed((np.ones((8, 3), "float32"), np.ones((8,), "int32")))]
      [TensorShape([None, 3]), TensorShape([None])]
    """

    def relax(leaf: Any) -> Any:
        if isinstance(leaf, tf.Tensor | np.ndarray):
            shape = tuple(leaf.shape)
            return tf.TensorSpec((None, *shape[1:]) if shape else (), tf.as_dtype(leaf.dtype))
        return leaf

    return tf.nest.map_structure(relax, batch)


class Signatures:
    """The widest batch signature traced for each batch structure, for one model.

    Example:
      >>> import keras, tensorflow as tf
      >>> from tfpure.signature import Signatures
      >>> signatures = Signatures(keras.Sequential([keras.Input((None, 4)), keras.layers.Dense(1)]))
      >>> first = signatures.widen(tf.TensorSpec((None, 7, 4)))
      >>> signatures.widen(tf.TensorSpec((None, 9, 4)))  # the sequence length varies
      TensorSpec(shape=(None, None, 4), dtype=tf.float32, name=None)
      >>> print(signatures.widen(tf.TensorSpec((None, 5, 4))))  # covered
      None
    """

    def __init__(self, model: Any):
        self.known: list[Any] = []  # the widest batch signature of each structure
        # Per flat model input, which dimensions its declaration fixes (None: no
        # declared inputs: a subclassed model, or a user-written body).
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

    def widen(self, signature: Any) -> Any:
        """The signature to trace for a batch of `signature`, or None if one covers it.

        A batch of a structure seen before widens that structure's signature:
        each dimension where the two differ becomes free (None), as
        ``reduce_retracing`` would, but never a dimension the model's declared
        inputs fix (`_pinned`).
        """
        new = tf.nest.flatten(signature)
        for index, known in enumerate(self.known):
            if not _same_kind(known, signature):
                continue
            old = tf.nest.flatten(known)
            if _covers(old, new):
                return None
            pinned = self._pinned(signature)
            widened = [_widened(o, n, fix) for o, n, fix in zip(old, new, pinned, strict=True)]
            if widened == old:
                return signature  # only pinned sizes differ: traced exactly, and checked
            self.known[index] = tf.nest.pack_sequence_as(known, widened)
            return self.known[index]
        self.known.append(signature)
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
    if is_composite(leaf):  # ragged, sparse: their exact spec
        return ("composite", tf.type_spec_from_value(leaf))
    return ("value", type(leaf), repr(leaf))


def _covers(general: list[Any], specific: list[Any]) -> bool:
    return all(
        g.is_compatible_with(s) if isinstance(g, tf.TensorSpec) else True
        for g, s in zip(general, specific, strict=True)
    )
