"""What the non-finite guard costs, piece by piece, on the tutorial MLP.

Run ``python benchmarks/guard_profile.py`` (about 4 minutes). Each piece of
the guard is switched off in a process of its own (the switch patches tfpure
before any step is traced), and each process measures, with
`tfpure.bench.compare`, the guarded step against the same step without the
guard in interleaved rounds: the paired ratio is what the guard costs with
that piece off. Pieces:

* ``checks``: the finiteness checks of the loss and of every model and
  optimizer variable after the update (replaced by "all finite");
* ``held``: holding every variable's value before the step to put it back
  (nothing held: a failed step would keep its update);
* ``both``: neither.

A profile, not a guard: with a piece off the guard no longer guards.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = Path(__file__).resolve().parent
PIECES = ("none", "checks", "held", "both")


def measure(off: str, rounds: int) -> None:
    """In this process: switch `off` a piece, print the paired guard / no-guard ratios."""
    import tensorflow as tf

    import tfpure.builtin
    import tfpure.guard

    sys.path.insert(0, str(HERE))
    import run

    from tfpure.bench import Variant, compare

    if off in ("checks", "both"):
        tfpure.builtin.finite_flags = lambda tensors: tf.ones([len(tensors)], tf.bool)
    if off in ("held", "both"):
        rollback_init = tfpure.guard.Rollback.__init__
        tfpure.guard.Rollback.__init__ = lambda self, variables, held=(): rollback_init(
            self, variables, ()
        )
    spec = run.WORKLOADS["tutorial_mlp"]
    variants = {}
    for name, k, xla in (("k=1", 1, False), ("k=16", 16, False), ("XLA k=16", 16, True)):
        variants[name] = Variant(steps_per_call=k, jit_compile=xla)
        variants[f"{name} no guard"] = Variant(steps_per_call=k, jit_compile=xla, nonfinite=None)
    result = compare(
        run.mlp_state(spec["build"]),
        run.SCCE,
        run.make_dataset(spec["features"], spec["batch"], spec["steps"]),
        variants=variants,
        rounds=rounds,
        steps=spec["steps"],
    )
    ratios = [f"{result.paired(n, f'{n} no guard'):.3f}" for n in ("k=1", "k=16", "XLA k=16")]
    print(f"| {off} | " + " | ".join(ratios) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--piece", choices=PIECES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.piece is not None:
        measure(args.piece, args.rounds)
        return
    print("| piece off | guard / no guard, k=1 | k=16 | XLA k=16 |")
    print("|---|---:|---:|---:|")
    for piece in PIECES:
        command = [sys.executable, __file__, "--piece", piece, "--rounds", str(args.rounds)]
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
