"""Test configuration shared by the test suite and the doctests."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from hypothesis import HealthCheck, Phase, settings
from hypothesis.database import DirectoryBasedExampleDatabase

# Tracing a TensorFlow graph takes a second or so: no deadline, few examples,
# and a fixed example order so a failure in CI replays as is on a laptop.
settings.register_profile(
    "ci",
    deadline=None,
    max_examples=5,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    deadline=None,
    max_examples=100,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# While debugging: random examples, failures stored and replayed first, no shrinking.
settings.register_profile(
    "debug",
    deadline=None,
    max_examples=5,
    print_blob=True,
    database=DirectoryBasedExampleDatabase(".hypothesis/examples"),
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The heaviest test files first (seconds of one worker, `pytest --durations=0`, summed by
# file): `--dist loadfile` hands a worker one file at a time, so a heavy file left for last
# runs alone while the other worker idles. Files not listed keep their order, after these.
HEAVY_FIRST = [
    "tests/test_xla_groups.py",
    "tests/test_checkpoint.py",
    "tests/test_compile_parity.py",
    "tests/test_distribute.py",
    "tests/test_steps.py",
    "tests/test_loop.py",
    "tests/test_fused.py",
    "tests/test_schedule.py",
    "tests/test_examples.py",
    "tests/test_make_step.py",
]


def pytest_collection_modifyitems(items):
    """Orders the files heaviest first (with `--no-loadscope-reorder`, pyproject.toml)."""
    rank = {path: i for i, path in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
