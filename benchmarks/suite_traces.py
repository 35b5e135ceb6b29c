"""Where the test suite's time goes: graph tracing per file, per traced function, per test.

    python benchmarks/suite_traces.py [pytest arguments...]

Runs the README's test command (`python -m pytest`, the options of
pyproject.toml: two xdist workers) with this module loaded as a pytest plugin
in every worker. Each call of TensorFlow's `func_graph_from_py_func` (one
trace of a graph function) is timed and charged to the test that made it;
traces nested in another trace are counted in it. Prints the suite's wall
time, the seconds spent tracing in the test processes (the subprocesses of
`tests/test_checkpoint.py`, `tests/test_distribute.py`, `tests/test_demo.py`
and `tests/test_loop.py` are not watched), and the largest shares by test
file, by traced function and by test. What is not tracing is graph
optimisation at a function's first call (grappler, XLA), the steps and
Python. Extra arguments go to pytest (``tests/test_fused.py -n 0``).
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

_OUT = "TFPURE_SUITE_TRACES"  # the folder each process writes its traces to
_traces: list[tuple[str | None, str, float]] = []  # (test, function, seconds)
_test: list[str | None] = [None]


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get(_OUT) is None:
        return
    if config.getoption("numprocesses", None) and "PYTEST_XDIST_WORKER" not in os.environ:
        return  # the xdist controller: its workers trace
    from tensorflow.python.framework import func_graph

    original = func_graph.func_graph_from_py_func
    depth = [0]

    def timed(name, *args, **kwargs):
        depth[0] += 1
        start = time.perf_counter()
        try:
            return original(name, *args, **kwargs)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                _traces.append((_test[0], str(name), time.perf_counter() - start))

    func_graph.func_graph_from_py_func = timed  # (tf.function's tracing reads it here)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    _test[0] = item.nodeid
    yield
    _test[0] = None


def pytest_unconfigure(config: pytest.Config) -> None:
    folder = os.environ.get(_OUT)
    if folder is not None and _traces:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        Path(folder, f"{worker}.json").write_text(json.dumps(_traces))


def _table(title: str, seconds: dict[str, list[float]], top: int) -> None:
    print(f"\n{title}:")
    for key, values in sorted(seconds.items(), key=lambda kv: -sum(kv[1]))[:top]:
        print(f"  {sum(values):7.1f} s  {len(values):4d} traces  {key}")


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        env = {"TF_CPP_MIN_LOG_LEVEL": "2", **os.environ, _OUT: folder}
        here = str(Path(__file__).resolve().parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH")]))
        start = time.perf_counter()
        command = [sys.executable, "-m", "pytest", "-q", "-p", "suite_traces", *sys.argv[1:]]
        done = subprocess.run(command, env=env, check=False)
        wall = time.perf_counter() - start
        traces = [t for f in Path(folder).glob("*.json") for t in json.loads(f.read_text())]
    total = sum(s for *_, s in traces)
    print(f"\nsuite: {wall:.1f} s wall (exit {done.returncode}); tracing {total:.1f} s "
          f"in {len(traces)} top-level traces, summed over the test processes")  # fmt: skip
    by_file, by_function, by_test = (collections.defaultdict(list) for _ in range(3))
    for test, name, seconds in traces:
        test = test or "(outside a test)"
        by_file[test.split("::")[0]].append(seconds)
        by_function[re.sub(r"_\d+$", "", name)].append(seconds)
        by_test[test].append(seconds)
    _table("by test file", by_file, 15)
    # tfpure's: _on_batch a single call, function a loop's on_next, _steps a fused call,
    # _on_groups an XLA group; multi_step_on_iterator and one_step_on_data: Keras' own.
    _table("by traced function", by_function, 12)
    _table("by test", by_test, 15)
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
