"""A minimal reproduction, for an upstream report: stateless random draws under XLA on CPU.

Keras' TensorFlow backend draws Dropout's masks with
``tf.random.stateless_uniform(..., alg="auto_select")`` (through
``tf.nn.experimental.stateless_dropout``). Compiled with ``jit_compile=True`` on a
CPU, that algorithm is far slower than the same draw in a plain graph, while
``alg="threefry"`` compiles to a fast generator. tfpure's XLA steps therefore
trace Keras' random ops with threefry (`tfpure.compat.keras_random_algorithm`).

    python benchmarks/xla_random.py [--shape 64 128] [--rounds 5] [--calls 200]

Prints, per algorithm, the median time of one draw (µs) in a plain graph and
under XLA, interleaved round by round, and each XLA time over the plain graph's
default (what Keras draws without XLA).
"""

from __future__ import annotations

import argparse
import statistics
import time

import tensorflow as tf

ALGORITHMS = ("auto_select", "philox", "threefry")


def draw_fn(shape: list[int], alg: str, jit_compile: bool):
    @tf.function(jit_compile=jit_compile, autograph=False)
    def draw(seed: tf.Tensor) -> tf.Tensor:
        return tf.random.stateless_uniform(shape, seed=seed, alg=alg)

    return draw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    seed = tf.constant([1, 2], tf.int32)
    fns, unsupported = {}, []
    for alg in ALGORITHMS:
        for jit in (False, True):
            fn = draw_fn(args.shape, alg, jit)
            try:  # trace and compile first
                fn(seed).numpy()
            except tf.errors.OpError as err:  # threefry has no plain CPU kernel
                unsupported.append(
                    f"{alg} {'XLA' if jit else 'plain'}: {err.message.splitlines()[0]}"
                )
                continue
            fns[(alg, jit)] = fn
    times: dict[tuple[str, bool], list[float]] = {key: [] for key in fns}
    for _ in range(args.rounds):
        for key, fn in fns.items():
            start = time.perf_counter()
            for _ in range(args.calls):
                out = fn(seed)
            out.numpy()
            times[key].append((time.perf_counter() - start) / args.calls * 1e6)
    print(f"tf {tf.__version__}, shape {args.shape}, median µs per draw of {args.rounds} rounds")
    print(f"{'alg':<12} {'plain':>10} {'XLA':>10}  XLA / plain auto_select")
    reference = statistics.median(times[("auto_select", False)])
    for alg in ALGORITHMS:
        plain, xla = (
            statistics.median(times[(alg, jit)]) if (alg, jit) in times else float("nan")
            for jit in (False, True)
        )
        print(f"{alg:<12} {plain:>10.1f} {xla:>10.1f}  {xla / reference:.2f}")
    for line in unsupported:
        print("unsupported:", line)


if __name__ == "__main__":
    main()
