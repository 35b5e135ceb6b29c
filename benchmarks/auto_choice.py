"""What ``jit_compile="auto", steps_per_call="auto"`` chooses, against the best hand-picked.

    python benchmarks/auto_choice.py mlp [--rounds 5] [--choices 3]
    python benchmarks/auto_choice.py mobilenet   # or transformer

For one workload of `benchmarks/run.py` (the tutorial MLP over its
``.batch(64)`` pipeline, MobileNetV3Small, the Transformer block), in one
process: `tp.bench.compare` times the four candidate configurations (XLA or
not, 1 or 16 steps a call; paired rounds through `fit_loop`), the fastest
median being the best hand-picked one. Then, ``--choices`` times, a first
epoch of `fit_loop` on a fresh state with a fresh "auto" step, and one with
the best configuration fixed (a fresh state: its traces again). Prints each
choice, its paired ratio to the best configuration (auto / best; the goal is
<= 1.05), and what the choice cost: the difference of the two epochs' wall
times (the other candidates' traces and XLA compiles, 256 trial steps), also
in steps of the best configuration.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import run

import tfpure as tp
from tfpure.bench import Variant, compare


def _name(jit: bool, k: int) -> str:
    return f"{'XLA' if jit else 'graph'} k={k}"


def workload(model: str):
    """(make_state, data, steps a round, title) of `model`."""
    if model == "mlp":
        return run.mlp_state(run.tutorial_mlp), run.make_dataset(64, 64, 64), 64, "tutorial MLP"
    spec = run.REAL_MODELS[model]
    data = run.real_model_data(model, spec["batch"], spec["steps"])
    return run.mlp_state(spec["build"]), data, spec["steps"], spec["title"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", choices=["mlp", "mobilenet", "transformer"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--choices", type=int, default=3)
    args = parser.parse_args()
    make_state, data, steps, title = workload(args.model)
    candidates = tp.make_train_step(run.SCCE, jit_compile="auto", steps_per_call="auto").candidates
    result = compare(
        make_state,
        run.SCCE,
        data,
        variants={_name(j, k): Variant(steps_per_call=k, jit_compile=j) for j, k in candidates},
        rounds=args.rounds,
        steps=steps,
        title=title,
    )
    medians = {c: result.median[_name(*c)] for c in candidates}
    best = min(medians, key=medians.__getitem__)
    print(f"{title}: per step (median of {args.rounds} rounds), best hand-picked {_name(*best)}")
    for c in candidates:
        paired = result.paired(_name(*c), _name(*best))
        print(f"  {_name(*c)}: {medians[c] * 1e3:.3f} ms, / best {paired:.3f}")
    fixed = tp.make_train_step(run.SCCE, jit_compile=best[0], steps_per_call=best[1])
    for i in range(args.choices):
        auto = tp.make_train_step(run.SCCE, jit_compile="auto", steps_per_call="auto")
        begin = time.perf_counter()
        tp.fit_loop(make_state(), data, auto, epochs=1, verbose=0)
        with_auto = time.perf_counter() - begin
        begin = time.perf_counter()
        tp.fit_loop(make_state(), data, fixed, epochs=1, verbose=0)  # a new state: traced anew
        with_best = time.perf_counter() - begin
        chosen = (auto.spec.jit_compile, auto.spec.steps_per_call)
        print(
            f"  choice {i + 1}: {_name(*chosen)}, auto / best "
            f"{result.paired(_name(*chosen), _name(*best)):.3f}; a first epoch of {steps} steps "
            f"took {with_auto:.1f} s with the choice, {with_best:.1f} s with the best fixed: "
            f"the choice cost {with_auto - with_best:.1f} s "
            f"= {(with_auto - with_best) / medians[best]:.0f} steps of the best"
        )


if __name__ == "__main__":
    main()
