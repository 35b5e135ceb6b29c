"""States and steps shared by the tests of one process: built once, put back at each use.

A fresh step traces its graph functions at its first run and, under XLA,
compiles them: seconds for a small model (an XLA run of a fresh step took 4.8 s
here, the same run on a reused one 0.04 s). Tests that run one configuration on
data of one shape share it through `reused`, which hands the state back as it
was built: a run on it computes what a run on a fresh one computes, bit for bit
(`tests/test_shared.py`).
"""

from tfpure.state import leaves, owned_variables

_BUILT: dict = {}


def reused(key, build):
    """`build()`'s ``(state, step)``, built at the first call for `key` in this process;
    every later call hands back the same objects as they were built: each variable
    the states own put back, the step's own running figures and example count reset.

    Only for runs that end normally: a test that makes its step fail, or asserts how
    many traces or which graph function a run took, builds its own.
    """
    if key not in _BUILT:
        state, step = build()
        owned = [v for s in leaves(state) for v in owned_variables(s)]
        _BUILT[key] = state, step, owned, [v.numpy() for v in owned]
    state, step, owned, start = _BUILT[key]
    for variable, value in zip(owned, start, strict=True):
        variable.assign(value)
    step.engine(state).examples.assign(0)
    step.reset_logs(state)
    return state, step
