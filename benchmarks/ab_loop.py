"""Two checkouts of tfpure side by side: fit_loop's per-step time on the tutorial MLP.

    python benchmarks/ab_loop.py OLD_CHECKOUT NEW_CHECKOUT [--pairs 7]

Each pair runs one process per checkout (the order alternating), each timing
``fit_loop`` over a step budget of 1,024 steps, five times after a warm-up,
from the window's begin to its end (no trace, no save): one step a call, 16
a call, XLA with 16 a call, and the same with a `Checkpointer` attached;
and, on a fresh state and step, the seconds of each configuration's first 16
steps (``first ...``: tracing, graph optimisation and XLA compilation). It
prints each pair's figures and, per configuration, the median over pairs of
new / old (a ratio measured within a pair, so a slow spell of the machine
cancels), and checkpointed / plain XLA for each checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CONFIGS = {
    "k1": {"steps_per_call": 1},
    "k16": {"steps_per_call": 16},
    "xla16": {"steps_per_call": 16, "jit_compile": True},
    "xla16_checkpointed": {"steps_per_call": 16, "jit_compile": True},
}


def measure() -> dict[str, float]:
    """This process's checkout: median microseconds per step of each configuration, and
    seconds of its first 16 steps."""
    import keras
    import numpy as np
    import tensorflow as tf

    import tfpure as tp

    class Window(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds = time.perf_counter() - self.start

    def state() -> tp.TrainState:
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(128, "relu", kernel_regularizer=keras.regularizers.L2(1e-4)),
                keras.layers.Dropout(0.2),
                keras.layers.Dense(10),
            ]
        )
        return tp.TrainState.create(
            model=model,
            optimizer=keras.optimizers.Adam(1e-3),
            metrics={"accuracy": keras.metrics.SparseCategoricalAccuracy()},
        )

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64 * 64, 64)).astype("float32")
    y = rng.integers(0, 10, 64 * 64).astype("int32")
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(64)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    out = {}
    for name, options in CONFIGS.items():
        s, step = state(), tp.make_train_step(loss, **options)

        def checkpoint(name: str = name) -> tp.Checkpointer | None:
            if not name.endswith("checkpointed"):
                return None
            return tp.Checkpointer(tempfile.mkdtemp(), save_every_epochs=None)

        begin = time.perf_counter()  # the first 16 steps: tracing, graph optimisation, XLA
        tp.fit_loop(s, data, step, steps=16, verbose=0, checkpoint=checkpoint())
        out[f"first {name}"] = time.perf_counter() - begin
        tp.fit_loop(s, data, step, steps=512, verbose=0, checkpoint=checkpoint())  # warm-up
        times = []
        for _ in range(5):
            window = Window()
            tp.fit_loop(
                s, data, step, steps=1024, verbose=0, callbacks=[window], checkpoint=checkpoint()
            )
            times.append(window.seconds / 1024 * 1e6)
        out[name] = statistics.median(times)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure()))
        return
    runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    for pair in range(args.pairs):
        for which in ("old", "new") if pair % 2 == 0 else ("new", "old"):
            env = {**os.environ, "PYTHONPATH": os.path.abspath(getattr(args, which))}
            env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
            done = subprocess.run(
                [sys.executable, __file__, args.old, args.new, "--measure"],
                env=env,
                cwd=tempfile.gettempdir(),  # not this checkout: PYTHONPATH decides
                capture_output=True,
                text=True,
                check=True,
            )
            runs[which].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(which, runs[which][-1], flush=True)
    for name in runs["new"][0]:
        ratios = [n[name] / o[name] for o, n in zip(runs["old"], runs["new"], strict=True)]
        print(f"{name}: new / old {statistics.median(ratios):.3f} (pairs: "
              f"{', '.join(f'{r:.3f}' for r in ratios)})")  # fmt: skip
    for which, figures in runs.items():
        ratio = statistics.median(f["xla16_checkpointed"] / f["xla16"] for f in figures)
        print(f"{which}: XLA x16 checkpointed / plain {ratio:.3f}")


if __name__ == "__main__":
    main()
