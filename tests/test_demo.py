"""The README's main job, run exactly as the README runs it."""

import re
import subprocess
import sys


def test_demo_trains_the_digits_and_measures_eager_slower_than_graph():
    done = subprocess.run(
        [sys.executable, "-m", "tfpure.demo"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    lines = out.strip().splitlines()
    last = re.fullmatch(r"val_accuracy: (\d\.\d{4})", lines[-1])
    assert last, lines[-3:]
    assert float(last.group(1)) >= 0.95
    # 1,437 training digits in batches of 64: 23 steps an epoch, 20 epochs.
    assert re.search(r"for 20 epochs \(460 steps\)", out), out[-2000:]
    timing = re.search(
        r"\(tfpure.bench, 3 rounds\): "
        r"eager ([\d.]+) ms, graph ([\d.]+) ms, eager/graph = ([\d.]+)x",
        out,
    )
    assert timing, out[-2000:]
    eager, graph, paired = map(float, timing.groups())
    # Compiled steps are much faster than eager ones on this CNN, by medians and paired rounds.
    assert eager > 2 * graph and paired > 2
    assert "Epoch 20/20" in out  # Keras' progress bar ran
