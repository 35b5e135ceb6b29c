"""The fused path's speed reference: the tutorial's MLP step in JAX + optax, `jit(lax.scan)`.

The same network as `benchmarks/run.py`'s tutorial MLP (64-128-10, ReLU,
Dropout 0.2, L2 1e-4 on the hidden kernel, Adam 1e-3 with Keras' epsilon,
sparse cross-entropy from logits), started from the Keras model's weights,
`k` steps per compiled call over batches stacked beforehand (the data is on
the device before the clock starts: no input pipeline in the loop, which
favours JAX). Optional: without `jax` and `optax` the benchmark says so and
leaves the row out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

try:
    import jax
    import jax.numpy as jnp
    import optax
except ImportError:  # pragma: no cover - the benchmark reports it
    jax = None

L2 = 1e-4
RATE = 0.2


def available() -> str | None:
    """None if JAX and optax are installed, else why the row is left out."""
    return None if jax is not None else "jax and optax are not installed (pip install jax optax)"


def jax_scan_loop(k: int) -> Callable[[Any, Any], Callable[[int], None]]:
    """A `tfpure.bench` custom runner: `k` JAX steps per `jit(lax.scan)` call."""

    def make(state: Any, data: Any) -> Callable[[int], None]:
        kernel1, bias1, kernel2, bias2 = (np.asarray(w) for w in state.model.get_weights())
        params = {"k1": kernel1, "b1": bias1, "k2": kernel2, "b2": bias2}
        params = jax.tree_util.tree_map(jnp.asarray, params)
        optimizer = optax.adam(1e-3, eps=1e-7)
        opt_state = optimizer.init(params)
        batches = [(np.asarray(x), np.asarray(y)) for x, y in data]
        usable = len(batches) // k * k
        xs = jnp.stack([x for x, _ in batches[:usable]]).reshape(-1, k, *batches[0][0].shape)
        ys = jnp.stack([y for _, y in batches[:usable]]).reshape(-1, k, *batches[0][1].shape)

        def loss_fn(p, x, y, key):
            hidden = jax.nn.relu(x @ p["k1"] + p["b1"])
            keep = jax.random.bernoulli(key, 1.0 - RATE, hidden.shape)
            hidden = jnp.where(keep, hidden / (1.0 - RATE), 0.0)
            logits = hidden @ p["k2"] + p["b2"]
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return ce + L2 * jnp.sum(p["k1"] ** 2)

        def one(carry, batch):
            p, s, key = carry
            key, sub = jax.random.split(key)
            loss, grads = jax.value_and_grad(loss_fn)(p, *batch, sub)
            updates, s = optimizer.update(grads, s, p)
            return (optax.apply_updates(p, updates), s, key), loss

        @jax.jit
        def call(carry, x, y):
            carry, losses = jax.lax.scan(one, carry, (x, y))
            return carry, losses.mean()

        carry = [(params, opt_state, jax.random.PRNGKey(0))]
        call(carry[0], xs[0], ys[0])[1].block_until_ready()  # compiled before the clock
        position = [0]

        def run(n: int) -> None:
            loss = None
            for _ in range(n // k):
                i = position[0] % len(xs)
                carry[0], loss = call(carry[0], xs[i], ys[i])
                position[0] += 1
            if loss is not None:
                loss.block_until_ready()

        return run

    return make
