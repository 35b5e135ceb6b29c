"""What a non-finite check costs by where the update waits for it, on the tutorial MLP.

Run ``python benchmarks/guard_designs.py`` (about 3 minutes). The tutorial's
step is written as a `tp.make_step` body (``nonfinite=None``: no tfpure guard)
in four ways, one `tfpure.bench.compare` run, interleaved rounds, paired
against the body without a check, at k=1, k=16 and XLA k=16:

* ``reduce``: the loss's and every gradient's finiteness computed and logged;
  the update does not wait for it (a cost floor, not a guard);
* ``assert``: the update waits for an assertion on them (a "raise" guard of
  the gradients; XLA drops assertions, so under XLA it guards nothing);
* ``cond``: the update runs in a ``tf.cond`` on them (a "skip" guard of the
  gradients);
* ``tfpure``: the same body under tfpure's guard (``nonfinite="raise"``: the
  logs, gradients and variables after the update checked, a failed step put
  back).

A profile, not a guard: ``reduce``, ``assert`` and ``cond`` check the
gradients only, not the state the update leaves.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf

import tfpure as tp
from tfpure.bench import Variant, compare

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # the benchmark's workloads

DESIGNS = ("none", "reduce", "assert", "cond")
CONFIGS = (("k=1", 1, False), ("k=16", 16, False), ("XLA k=16", 16, True))


def body(design: str):
    """The tutorial's step over one state, with the gradient check `design`."""

    def fn(state: tp.TrainState, batch):
        x, y = batch
        model = state.model
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = run.SCCE(y, logits) + tf.add_n(model.losses)
        grads = tape.gradient(loss, model.trainable_variables)

        def commit() -> tf.Tensor:
            state.apply_gradients(grads)
            state.metrics["loss"].update_state(loss)
            state.metrics["accuracy"].update_state(y, logits)
            return tf.constant(True)

        logs = {"loss": loss}
        if design == "none":
            commit()
            return state, logs
        finite = [tf.reduce_all(tf.math.is_finite(g)) for g in grads]
        fine = tf.logical_and(tf.math.is_finite(loss), tf.reduce_all(finite))
        if design == "cond":
            tf.cond(fine, commit, lambda: tf.constant(False))
        elif design == "assert":
            with tf.control_dependencies([tf.debugging.Assert(fine, ["non-finite"])]):
                commit()
        else:  # "reduce"
            commit()
            logs["finite"] = tf.cast(fine, tf.float32)
        return state, logs

    return fn


def runner(step: tp.Step, k: int):
    """`Variant(custom=...)`: `step` called on a kept iterator, k steps a call."""

    def make(state: tp.TrainState, data: tf.data.Dataset):
        iterator = iter(data.repeat())

        def go(n: int) -> None:
            for _ in range(n // k):
                _, logs, _ = step.run_on_iterator(state, iterator)
            float(logs["loss"])  # wait for the last call

        return go

    return make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    spec = run.WORKLOADS["tutorial_mlp"]
    variants = {}
    for name, k, xla in CONFIGS:
        for design in DESIGNS:
            step = tp.make_step(body(design), steps_per_call=k, jit_compile=xla, nonfinite=None)
            variants[f"{name} {design}"] = Variant(steps_per_call=k, custom=runner(step, k))
        guarded = tp.make_step(body("none"), steps_per_call=k, jit_compile=xla)
        variants[f"{name} tfpure"] = Variant(steps_per_call=k, custom=runner(guarded, k))
    result = compare(
        run.mlp_state(spec["build"]),
        run.SCCE,
        run.make_dataset(spec["features"], spec["batch"], spec["steps"]),
        variants=variants,
        rounds=args.rounds,
        steps=spec["steps"],
        title="guard designs, tutorial MLP",
    )
    print(result.to_markdown())
    print("\n| design / no check (paired) | " + " | ".join(n for n, _, _ in CONFIGS) + " |")
    print("|---|" + "---:|" * len(CONFIGS))
    for design in (*DESIGNS[1:], "tfpure"):
        ratios = [result.paired(f"{n} {design}", f"{n} none") for n, _, _ in CONFIGS]
        print(f"| {design} | " + " | ".join(f"{r:.3f}" for r in ratios) + " |")


if __name__ == "__main__":
    main()
