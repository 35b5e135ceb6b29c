"""The README's property-test example, run as the README shows it."""

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_readme_property_test_file_runs_and_passes(tmp_path):
    text = README.read_text()
    block = re.search(r"# test_my_training\.py.*?\n(.*?)```", text, re.S)
    assert block, "the README lost its property-test example"
    namespace = {"__name__": "test_my_training"}
    exec(compile(block.group(1), str(tmp_path / "test_my_training.py"), "exec"), namespace)
    tests = [f for name, f in namespace.items() if name.startswith("test_")]
    assert len(tests) == 3
    for test in tests:
        test()
