"""Arrays in memory as batches: what `fit_loop`, `evaluate` and `predict` do with `batch_size=`.

Keras users pass arrays to `fit`; tfpure's loops take batches. Given
``batch_size=``, the loops take arrays too (``x``, ``(x, y)`` or
``(x, y, sample_weight)``; NumPy arrays, tensors, or dicts of them by input
name) and slice them into batches of that size, in order (the last batch
ragged, as Keras makes it), or shuffled anew each epoch from a seed.

The batches are slices of the arrays kept as tensors, not a per-example
pipeline: an epoch's batches are one reshape of the arrays (of their
shuffled copy), and an XLA step's groups of k batches (`Step.grouped`) are
one ragged view of it, so a fused call pulls one element for its k steps.

The shuffled order, documented so that it can be reproduced: each epoch
draws one int64 ``r`` from ``tf.data.Dataset.random(seed=seed,
rerandomize_each_iteration=True)`` (anew for each pass over the data) and
takes the examples in the order
``tf.random.experimental.stateless_shuffle(tf.range(n), seed=[r, 0])``.
As for every `tf.data` seed, ``r`` depends on the seed and on TensorFlow's
global seed (``keras.utils.set_random_seed``): with both the same, every
run draws the same orders, and a resumed run replays them exactly (a
`Checkpointer` refuses a resume under another global seed). A shuffled
epoch holds its shuffled copy of the arrays while it runs.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from tfpure.compat import endless_source, sliced_arrays
from tfpure.types import check_count

__all__ = ["array_groups", "from_arrays"]

# The datasets `from_arrays` made (and the tutorials' pipelines grouped), each with the
# slicer of its batches and their groups.
_GROUPS: weakref.WeakKeyDictionary[tf.data.Dataset, _Slicer] = weakref.WeakKeyDictionary()


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
    slicer = _Slicer(arrays, _length(arrays, argument), batch_size, seed)
    dataset = slicer.batches()
    _GROUPS[dataset] = slicer
    return dataset


def array_groups(data: tf.data.Dataset, k: int) -> tf.data.Dataset | None:
    """The batches of `data` made by `from_arrays`, or by the tutorials' pipeline
    ``tf.data.Dataset.from_tensor_slices(arrays).batch(n)`` (maybe then prefetched),
    maybe then repeated endlessly (where an epoch is whole groups), `k` to an element;
    None for other data.

    Equal, element for element and bit for bit, to ``data.ragged_batch(k)``
    (its element spec too), and sliced from the arrays instead of stacked
    from `k` batches (`tfpure.graph.group_batches` takes it when it can).

    Example:
      >>> import numpy as np
      >>> from tfpure.arrays import array_groups, from_arrays
      >>> data = from_arrays(np.arange(10.0), 4)  # batches of 4, 4 and 2
      >>> [g.row_lengths().numpy().tolist() for g in array_groups(data, 2)]
      [[4, 4], [2]]
      >>> print(array_groups(data.take(2), 2))
      None
    """
    source = endless_source(data)
    slicer = _slicer(data if source is None else source)
    if slicer is None:
        return None
    return slicer.groups(k) if source is None else slicer.repeated_groups(k)


def _slicer(data: tf.data.Dataset) -> _Slicer | None:
    """The slicer of `data`'s batches: `from_arrays`'s, or one of the arrays a tutorials'
    pipeline slices (`compat.sliced_arrays`: the very arrays, no copy)."""
    slicer = _GROUPS.get(data)
    if slicer is None:
        found = sliced_arrays(data)
        if found is None:
            return None
        arrays, size = found
        n = int(tf.nest.flatten(arrays)[0].shape[0])  # (the pipeline checked they agree)
        if n == 0:
            return None
        slicer = _GROUPS[data] = _Slicer(arrays, n, size, None)
    return slicer


class _Slicer:
    """Batches and groups of batches sliced from `arrays` (`n` examples), in order or, with
    a `seed`, in the order the module's docstring documents."""

    def __init__(self, arrays: Any, n: int, batch_size: int, seed: int | None):
        self.arrays, self.n, self.batch_size = arrays, n, batch_size
        self.count = -(-n // batch_size)  # batches an epoch
        self._groups: dict[int, tf.data.Dataset] = {}
        self._repeated: dict[int, tf.data.Dataset] = {}
        # One draw an epoch, shared by the batches and their groups (as a shuffle inside
        # `data` is shared by ``data.ragged_batch(k)``).
        self.draws = (
            None
            if seed is None
            else tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).take(1)
        )

    def _epoch(self, slices: Callable[[Any], tf.data.Dataset], count: int) -> tf.data.Dataset:
        if self.draws is None:
            return slices(self.arrays)
        n = self.n

        def shuffled(r: tf.Tensor) -> tf.data.Dataset:
            order = tf.random.experimental.stateless_shuffle(
                tf.range(n, dtype=tf.int64), seed=tf.stack([r, tf.constant(0, tf.int64)])
            )
            return slices(tf.nest.map_structure(lambda a: tf.gather(a, order), self.arrays))

        return self.draws.flat_map(shuffled).apply(tf.data.experimental.assert_cardinality(count))

    def batches(self) -> tf.data.Dataset:
        """An epoch's batches: the whole ones as one reshape, then the ragged last one."""
        n, size = self.n, self.batch_size
        whole = n // size * size

        def slices(arrays: Any) -> tf.data.Dataset:
            full = tf.data.Dataset.from_tensor_slices(
                tf.nest.map_structure(
                    lambda a: tf.reshape(
                        a if whole == n else a[:whole], [n // size, size, *a.shape[1:]]
                    ),
                    arrays,
                )
            )
            # (The last batch, empty when every batch is whole: its dataset is concatenated
            # anyway, so that the batches' first size is None, as ``.batch(size)`` makes it.)
            rest = tf.data.Dataset.from_tensor_slices(
                tf.nest.map_structure(lambda a: a[whole:][None], arrays)
            )
            return full.concatenate(rest.take(int(whole < n)))

        return self._epoch(slices, self.count)

    def groups(self, k: int) -> tf.data.Dataset:
        """An epoch's batches `k` to an element: one ragged view of the arrays (made once for
        each `k`: every loop over the batches then iterates the same dataset)."""
        if k not in self._groups:
            self._groups[k] = self._grouped(k)
        return self._groups[k]

    def repeated_groups(self, k: int) -> tf.data.Dataset | None:
        """The groups of the batches repeated endlessly (a step budget's data): an epoch's
        groups repeated, where its batches are whole groups of `k` (no group of
        ``ragged_batch(k)`` then spans two epochs); None where they are not."""
        if self.count % k:
            return None
        if k not in self._repeated:
            self._repeated[k] = self.groups(k).repeat()
        return self._repeated[k]

    def _grouped(self, k: int) -> tf.data.Dataset:
        batches = tf.minimum(tf.range(self.count + 1, dtype=tf.int64) * self.batch_size, self.n)
        calls = -(-self.count // k)
        groups = tf.minimum(tf.range(calls + 1, dtype=tf.int64) * k, self.count)

        def slices(arrays: Any) -> tf.data.Dataset:
            return tf.data.Dataset.from_tensor_slices(
                tf.nest.map_structure(
                    # (Splits right by construction: unchecked, which makes an iterator
                    # of shuffled arrays 8x quicker to create.)
                    lambda a: tf.RaggedTensor.from_nested_row_splits(
                        a, [groups, batches], validate=False
                    ),
                    arrays,
                )
            )

        return self._epoch(slices, calls)


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
