"""The README's main job, run exactly as the README runs it."""

import re
import subprocess
import sys


def test_demo_reaches_95_percent_validation_accuracy():
    done = subprocess.run(
        [sys.executable, "-m", "tfpure.demo"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    last = re.fullmatch(r"val_accuracy: (\d\.\d{4})", lines[-1])
    assert last, lines[-3:]
    assert float(last.group(1)) >= 0.95
    assert any(re.search(r"eager/graph = \d+\.\dx", line) for line in lines)
    assert "Epoch 20/20" in done.stdout  # Keras' progress bar ran
