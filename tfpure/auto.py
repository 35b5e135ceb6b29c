"""`AutoStep`: a step whose ``jit_compile`` and ``steps_per_call`` are chosen by timing.

``make_train_step(loss, jit_compile="auto", steps_per_call="auto")`` (and
`make_eval_step`, `make_step`) returns an `AutoStep`. The first loop that
runs it (`fit_loop`, `fold`, `evaluate`) or an explicit ``step.choose(state,
data)`` times every candidate configuration on the data's first batches and
keeps the fastest (`chosen`, a plain `tfpure.steps.Step`):

* the candidates: ``jit_compile`` in (False, True) and ``steps_per_call`` in
  `CANDIDATE_STEPS` (1, 16), for the options given as ``"auto"`` (under a
  `tf.distribute` strategy, which refuses XLA, the plain graph's only);
* the trial: the first `TRIAL_BATCHES` batches of the data are read once
  (cached in memory), then every candidate runs a warm-up call (its trace,
  and XLA's compile) and `TRIAL_ROUNDS` rounds of `TRIAL_STEPS` steps on
  them, in turns, as a quiet loop runs it (at one step a call, in guard
  windows when the loop asks for them); the fastest median time per step
  wins. That is ``16 + 3 * 16 = 64`` steps per candidate, besides traces;
* nothing the trial ran is kept: every variable a `Checkpointer` saves
  (weights, optimizer slots, metrics, random-seed states) and the chosen
  step's own figures are put back, so the run that follows is the chosen
  configuration's run from the same state.

The chosen configuration decides the floats: XLA and the plain graph round
differently in the last bits and draw different Dropout masks (the steps per
call do not change them: fused steps equal single steps bit for bit). Timing
noise may choose differently on another run; pass the chosen values
(``step.spec``) instead of ``"auto"`` to reproduce a run. Reading the trial
batches draws one order of a reshuffling dataset (as one more epoch would),
so the run's epochs take the orders after it; a fixed configuration after one
pass over the same dataset reproduces them. A `fit_loop` with a
`Checkpointer` records the configuration, and a resumed run takes it from
the checkpoint instead of timing again (reading the trial batches once, as
the first run did), so it resumes bit for bit.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from tfpure.distribute import cluster_task, strategy_of
from tfpure.state import leaves, owned_variables

__all__ = ["CANDIDATE_STEPS", "TRIAL_BATCHES", "TRIAL_ROUNDS", "TRIAL_STEPS", "AutoStep"]

CANDIDATE_STEPS = (1, 16)
TRIAL_BATCHES = 16
TRIAL_ROUNDS = 3
TRIAL_STEPS = 16
_WARM_UP = 16

Configuration = tuple[bool, int]  # (jit_compile, steps_per_call)


_EXPECTED = {"jit_compile": "True, False or 'auto'", "steps_per_call": "an int >= 1 or 'auto'"}


def check_auto(name: str, value: Any) -> bool:
    """Whether option `name` is ``"auto"``; another string is refused here."""
    if isinstance(value, str):
        if value != "auto":
            raise TypeError(f"`{name}` must be {_EXPECTED[name]}; got {value!r}.")
        return True
    return False


class AutoStep:
    """A step that times its candidate configurations on the data, then runs the fastest.

    Made by the step factories given ``jit_compile="auto"`` or
    ``steps_per_call="auto"``. The loops choose before they start; after the
    choice the `AutoStep` is its `chosen` step (calls and attributes go to it).

    Attributes:
      candidates: the ``(jit_compile, steps_per_call)`` configurations timed.
      chosen: the chosen `Step` (None before the choice).
      timings: seconds per step of each candidate, the median of its rounds
        (empty before the choice, and when it was taken from a checkpoint).
      spec: the chosen step's `StepSpec` (None before the choice).

    Example:
      >>> import keras, tensorflow as tf, tfpure as tp
      >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
      >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())
      >>> step = tp.make_train_step("mse", steps_per_call="auto")
      >>> step.candidates
      [(False, 1), (False, 16)]
      >>> data = tf.data.Dataset.from_tensors((tf.ones((4, 3)), tf.ones((4, 1)))).repeat(40)
      >>> state, history = tp.fit_loop(state, data, step, epochs=1, verbose=0)
      >>> (step.spec.jit_compile, step.spec.steps_per_call) in step.candidates
      True
      >>> step.timings[(False, step.spec.steps_per_call)] == min(step.timings.values())
      True
    """

    def __init__(
        self,
        make: Callable[[bool, int], Any],
        *,
        kind: str,
        jit_compile: bool | str,
        steps_per_call: int | str,
    ):
        jits = (False, True) if check_auto("jit_compile", jit_compile) else (jit_compile,)
        if check_auto("steps_per_call", steps_per_call):
            ks: tuple[Any, ...] = CANDIDATE_STEPS
        else:
            ks = (steps_per_call,)
        # Each candidate's options are checked now, by the factory.
        self._steps = {(j, k): make(j, k) for j in jits for k in ks}
        self.candidates: list[Configuration] = list(self._steps)
        self.kind = kind
        self.chosen: Any = None
        self.timings: dict[Configuration, float] = {}

    @property
    def spec(self) -> Any:
        return None if self.chosen is None else self.chosen.spec

    def choose(
        self,
        state: Any,
        data: Any,
        *,
        span: bool = True,
        recorded: Configuration | None = None,
        verbose: int = 0,
    ) -> Any:
        """Chooses the configuration (once) and returns the chosen `Step`.

        Args:
          state: the state (or structure of states) the step will run on.
          data: a `tf.data.Dataset` of batches; its first `TRIAL_BATCHES`
            batches time the candidates.
          span: time one step a call as a loop that asks for guard windows
            runs it (`Step.span`); False: one step a graph call.
          recorded: a configuration recorded by a checkpoint of this run:
            taken, if it is a candidate, without timing.
          verbose: nonzero prints the choice (one line).

        Raises:
          TypeError: `data` is not a `tf.data.Dataset`.
          ValueError: `data` held no batch; or the state is under a
            multi-worker strategy (each worker would time, and might choose,
            on its own) and nothing is recorded.

        Example:
          >>> import keras, tensorflow as tf, tfpure as tp
          >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
          >>> state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())
          >>> step = tp.make_train_step("mse", jit_compile="auto")
          >>> data = tf.data.Dataset.from_tensors((tf.ones((4, 3)), tf.ones((4, 1)))).repeat(4)
          >>> chosen = step.choose(state, data, recorded=(True, 1))  # e.g. from a checkpoint
          >>> chosen.spec.jit_compile, int(state.step)
          (True, 0)
        """
        if self.chosen is not None:
            return self.chosen
        if not isinstance(data, tf.data.Dataset):
            raise TypeError(
                "A step with jit_compile='auto' or steps_per_call='auto' times its "
                "candidates on the first batches of a tf.data.Dataset; got "
                f"{type(data).__name__}. Pass a dataset, or fix the configuration "
                f"(one of {self.candidates})."
            )
        strategy = strategy_of(leaves(state))
        if strategy is not None:  # (XLA is refused under a strategy: `graph._check_xla`)
            self._steps = {c: s for c, s in self._steps.items() if not c[0]} or self._steps
            self.candidates = list(self._steps)
        if recorded is None and cluster_task(strategy) is not None:
            raise ValueError(
                "'auto' times the candidates in each process, and workers could choose "
                "differently: under a multi-worker strategy, pass jit_compile= and "
                f"steps_per_call= (one of {self.candidates})."
            )
        trial = data.take(TRIAL_BATCHES).cache()
        read = sum(1 for _ in trial)  # read once (drawing one order of a reshuffling dataset)
        if not read:
            raise ValueError("The data held no batch: there is nothing to time the candidates on.")
        if recorded is not None and tuple(recorded) in self._steps:
            best, how = tuple(recorded), "as the checkpoint recorded"
            self.chosen = self._steps[best]
        else:
            self.timings = self._time(state, trial, span)
            best = min(self.timings, key=self.timings.__getitem__)
            how = "timed: " + ", ".join(
                f"{_name(c)} {t * 1e3:.3g} ms/step" for c, t in self.timings.items()
            )
            self.chosen = self._steps[best]
            self.chosen.reset_logs(state)  # its own figures, as before the trial
            self.chosen.engine(state).examples.assign(0)
        self._steps = {}  # (the other candidates' graphs go)
        if verbose:
            print(f"tfpure: chose {_name(best)} ({how})")
        return self.chosen

    def _time(self, state: Any, trial: tf.data.Dataset, span: bool) -> dict[Configuration, float]:
        """Each candidate's median seconds per step; every variable of the states (what a
        `Checkpointer` saves of them) put back before each candidate's turn and after."""
        variables = [v for s in leaves(state) for v in owned_variables(s)]
        before = [v.numpy() for v in variables]

        def put_back() -> None:
            for v, value in zip(variables, before, strict=True):
                v.assign(value)

        rounds: dict[Configuration, list[float]] = {c: [] for c in self.candidates}
        try:
            for r in range(TRIAL_ROUNDS + 1):
                turn = r % len(self.candidates)
                for c in self.candidates[turn:] + self.candidates[:turn]:
                    put_back()
                    seconds = _seconds_per_step(
                        self._steps[c], state, trial, span, TRIAL_STEPS if r else _WARM_UP
                    )
                    if r:
                        rounds[c].append(seconds)
        finally:
            put_back()
        return {c: statistics.median(times) for c, times in rounds.items()}

    def _unchosen(self) -> TypeError:
        return TypeError(
            "This step chooses its configuration ('auto') on the data's first batches "
            "before it runs: run it in a loop (fit_loop, fold, evaluate) or call "
            f"step.choose(state, dataset) first. Its candidates: {self.candidates}."
        )

    def __call__(self, state: Any, batch: Any) -> Any:
        if self.chosen is None:
            raise self._unchosen()
        return self.chosen(state, batch)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("chosen", "_steps"):
            raise AttributeError(name)
        if self.chosen is None:  # (an AttributeError: `hasattr` and protocol checks say no)
            raise AttributeError(f"{name!r}: {self._unchosen()}")
        return getattr(self.chosen, name)

    def __repr__(self) -> str:
        if self.chosen is not None:
            return f"AutoStep(chosen={self.chosen!r})"
        return f"AutoStep(kind={self.kind!r}, candidates={self.candidates})"


def _name(configuration: Configuration) -> str:
    return f"jit_compile={configuration[0]}, steps_per_call={configuration[1]}"


def _seconds_per_step(
    step: Any, state: Any, trial: tf.data.Dataset, span: bool, steps: int
) -> float:
    """Seconds per step of `step` over `steps` steps of the repeated `trial` batches."""
    data = trial.repeat()
    groups = step.grouped(state, data)
    run = step.runner(  # (`lasting`: the batches repeat)
        state,
        iter(data if groups is None else groups),
        grouped=groups is not None,
        span=span,
        lasting=True,
    )
    most = step.span(state) if span else step.steps_per_call
    done, start = 0, time.perf_counter()
    while done < steps:
        done += int(run(min(most, steps - done))[1])
    return (time.perf_counter() - start) / done
