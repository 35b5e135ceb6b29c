"""Arrays in memory as batches: what `fit_loop`, `evaluate` and `predict` do with `batch_size=`.

Keras users pass arrays to `fit`; tfpure's loops take batches. Given
``batch_size=``, the loops take arrays too (``x``, ``(x, y)`` or
``(x, y, sample_weight)``; NumPy arrays, tensors, or dicts of them by input
name) and slice them into batches of that size, in order (the last batch
ragged, as Keras makes it), or shuffled anew each epoch from a seed: the
order is `tf.data`'s ``shuffle(n, seed, reshuffle_each_iteration=True)``. As
for every `tf.data` shuffle, it depends on the seed and on TensorFlow's
global seed (``keras.utils.set_random_seed``): with both the same, every run
draws the same order, and a resumed run replays it exactly (a `Checkpointer`
refuses a resume under another global seed).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from tfpure.types import check_count

__all__ = ["from_arrays"]


def from_arrays(
    data: Any, batch_size: int | None, *, shuffle: bool | int = False, argument: str = "data"
) -> Any:
    """`data` sliced into batches of `batch_size`; `data` itself when `batch_size` is None.

    Args:
      data: ``x``, ``(x, y)`` or ``(x, y, sample_weight)`` whose arrays (NumPy
        arrays, tensors, dicts of them) share their first dimension.
      batch_size: examples per batch (the last batch holds the rest); None:
        `data` is batches already and is returned as it is.
      shuffle: False: in order; True: shuffled each epoch with seed 0; an int:
        with that seed.
      argument: how error messages name `data`.

    Returns:
      A `tf.data.Dataset` of batches (or `data`).

    Raises:
      ValueError: `batch_size` is not an int >= 1; the arrays differ in
        length or hold no example; `shuffle` is given without `batch_size`.
      TypeError: `data` is a dataset or an iterable of batches, not arrays.

    Example:
      >>> import numpy as np
      >>> from tfpure.arrays import from_arrays
      >>> x, y = np.arange(10.0).reshape(5, 2), np.arange(5)
      >>> [b[1].numpy().tolist() for b in from_arrays((x, y), 2)]
      [[0, 1], [2, 3], [4]]
      >>> [b[1].numpy().tolist() for b in from_arrays((x, y), 5, shuffle=3)] != [[0, 1, 2, 3, 4]]
      True
    """
    if batch_size is None:
        if shuffle is not False:
            raise ValueError(
                f"`shuffle` orders arrays given with `batch_size=`; `{argument}` is batches "
                "already (shuffle a tf.data.Dataset with dataset.shuffle(n, seed=...))."
            )
        return data
    check_count("batch_size", batch_size)
    if isinstance(shuffle, bool) or shuffle is None:
        seed = 0 if shuffle else None
    else:
        seed = check_count("shuffle", shuffle, minimum=0, meaning="a seed (or True / False)")
    arrays = _arrays(data, argument)
    n = _length(arrays, argument)
    dataset = tf.data.Dataset.from_tensor_slices(arrays)
    if seed is not None:
        dataset = dataset.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size)


def _arrays(data: Any, argument: str) -> Any:
    if isinstance(data, tf.data.Dataset) or not isinstance(
        data, tuple | dict | np.ndarray | tf.Tensor
    ):
        raise TypeError(
            f"`batch_size=` slices arrays: `{argument}` must be x, (x, y) or (x, y, "
            "sample_weight) of NumPy arrays or tensors (or dicts of them by input name); "
            f"got {type(data).__name__}. A dataset or an iterable of batches is batched "
            "already: leave batch_size out."
        )
    return tf.nest.map_structure(tf.convert_to_tensor, data)


def _length(arrays: Any, argument: str) -> int:
    lengths = {int(a.shape[0]) if a.shape.rank else 0 for a in tf.nest.flatten(arrays)}
    if len(lengths) != 1:
        raise ValueError(
            f"The arrays of `{argument}` must hold the same number of examples (their first "
            f"dimension); got {sorted(lengths)}."
        )
    n = lengths.pop()
    if n == 0:
        raise ValueError(f"`{argument}` held no example.")
    return n
