"""Every Python block of the README and of docs/ runs, top to bottom, page by page."""

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def python_blocks(page):
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


# Pages with Python blocks (every page but a guide made of figures alone).
PAGES = [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if python_blocks(p)]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_python_block_of_the_page_runs(page, tmp_path, monkeypatch):
    blocks = python_blocks(page)
    monkeypatch.chdir(tmp_path)  # anything a block writes lands here
    namespace = {"__name__": f"docs_{page.stem}"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{page.name} block {i + 1}", "exec"), namespace)
    # A block that is a test file (the testing kit's) has its tests called too.
    for name, fn in list(namespace.items()):
        if name.startswith("test_") and callable(fn):
            fn()


def test_the_readme_stays_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for guide in (
        "steps",
        "research",
        "checkpoints",
        "scaling-out",
        "testing-kit",
        "performance",
        "schedules",
    ):
        assert f"docs/{guide}.md" in readme
        assert (ROOT / "docs" / f"{guide}.md").exists()
    assert os.path.exists(ROOT / "LICENSE") and os.path.exists(ROOT / "CHANGELOG.md")
