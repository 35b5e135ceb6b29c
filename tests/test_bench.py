"""tfpure.bench: every variant runs the steps it reports, ratios come from the rounds."""

import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpure as tp
from tfpure.bench import BenchResult, compare, main

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
MADE: list[tp.TrainState] = []


def make_state():
    """A small CNN with BatchNorm and Dropout; every state made is kept to count its steps."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(10),
        ]
    )
    state = tp.TrainState.create(
        model=model,
        optimizer=keras.optimizers.Adam(1e-3),
        metrics={"accuracy": keras.metrics.SparseCategoricalAccuracy()},
    )
    MADE.append(state)
    return state


def make_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 8, 8, 1)).astype("float32")
    return tf.data.Dataset.from_tensor_slices((x, rng.integers(0, 10, 96))).batch(32)


def steps_taken(state):
    return int(state.model.optimizer.iterations if state.model.compiled else state.step)


def test_every_variant_on_a_cnn_runs_the_steps_it_divides_by():
    MADE.clear()
    start = time.perf_counter()
    result = compare(make_state, SCCE, make_data(), steps_per_call=4, rounds=2, steps=8)
    wall = time.perf_counter() - start
    assert result.variants == ("eager", "graph", "fused", "xla", "keras_fit")
    # 3 batches an epoch: the budget repeats the data; eager runs an eighth, at least 1 step.
    assert result.steps == {"eager": 1, "graph": 8, "fused": 8, "xla": 8, "keras_fit": 8}
    # One warm-up round and two measured: each state trained exactly 3 rounds of its steps.
    assert [steps_taken(s) for s in MADE] == [3 * n for n in result.steps.values()]
    assert all(len(r) == 2 for r in result.rounds.values())
    assert set(result.outside) == set(result.rounds)
    assert result.paired("eager", "graph") > 2
    # The measured rounds (steps x seconds per step, plus set-up outside the steps) are
    # disjoint stretches of the call's own wall time: together no longer than it.
    measured = [
        seconds * result.steps[name] + outside
        for name in result.variants
        for seconds, outside in zip(
            result.rounds[name], result.outside.get(name) or (0.0, 0.0), strict=True
        )
    ]
    assert all(t > 0 for t in measured) and sum(measured) < wall
    table = result.to_markdown()
    assert "2 rounds after 1 warm-up" in table and "tensorflow " + tf.__version__ in table
    assert all(f"| {name} |" in table for name in result.variants)


def test_a_user_written_body_own_variants_and_a_hand_written_loop():
    def body(state, batch):  # recognised as a body by its first parameter
        x, y = batch
        with tf.GradientTape() as tape:
            loss = SCCE(y, state.model(x, training=True))
        state = state.apply_gradients(tape.gradient(loss, state.model.trainable_variables))
        return state, {"loss": loss}

    ran = []

    def hand_written(state, data):
        return lambda n: ran.append(n) or np.float32(n)  # "runs" n steps; no float returned

    def timing_itself(state, data):
        return lambda n: 0.25 * n  # runner(n): its steps "took" 0.25 s each (a float)

    variants = {
        "no guard": tp.bench.Variant(steps_per_call=1, nonfinite=None),
        "fused": tp.bench.VARIANTS["fused"],
        "mine": tp.bench.Variant(custom=hand_written),
        "timed": tp.bench.Variant(custom=timing_itself),
        "keras_fit": tp.bench.VARIANTS["keras_fit"],
    }
    MADE.clear()
    result = compare(make_state, body, make_data(), variants=variants, rounds=2, steps=2)
    assert result.steps == {"no guard": 2, "fused": 16, "mine": 2, "timed": 2}
    assert [steps_taken(s) for s in MADE[:2]] == [6, 48]  # a warm-up and two rounds each
    assert ran == [2, 2, 2] and set(result.outside) == {"no guard", "fused", "timed"}
    assert result.rounds["timed"] == (0.25, 0.25)  # the seconds a runner returns, per step
    assert "no Keras compile equivalent" in result.skipped["keras_fit"]
    table = result.to_markdown()
    assert "| mine |" in table and "| — |" in table and "| keras_fit | skipped:" in table
    with pytest.raises(ValueError, match="No variant could run: keras_fit: a user-written step"):
        compare(make_state, body, make_data(), variants=("keras_fit",))

    def my_body(s, batch):  # not recognised: read as a loss, and the message says so
        return body(s, batch)

    with pytest.raises(TypeError, match=r"read 'my_body' as a loss.*pass tp\.make_step\(my_body\)"):
        compare(make_state, my_body, make_data(), variants=("graph",), rounds=1, steps=2)

    def full_control(model, batch, training):  # (model, batch, training): a loss all the same
        x, y = batch
        y_pred = model(x, training=training)
        return SCCE(y, y_pred), y_pred

    result = compare(make_state, full_control, make_data(), variants=("graph",), rounds=1, steps=2)
    assert result.steps == {"graph": 2} and len(result.rounds["graph"]) == 1


def test_the_chart_is_written_with_a_log_axis_when_the_values_span_widely(tmp_path):
    pytest.importorskip("matplotlib")
    result = BenchResult(
        rounds={"eager": (0.05, 0.06), "graph": (1e-3, 2e-3), "keras_fit": (2e-3, 3e-3)},
        steps={"eager": 8, "graph": 64, "keras_fit": 64},
        machine=tp.bench.machine(),
        title="cnn",
        families={"eager": "tfpure", "graph": "tfpure", "keras_fit": "Keras fit"},
    )
    result.plot(tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_are_named_before_any_state_is_made():
    MADE.clear()
    data = make_data()
    with pytest.raises(ValueError, match=r"Unknown variant\(s\) \['gpu'\]; known: \["):
        compare(make_state, SCCE, data, variants=("graph", "gpu"))
    with pytest.raises(ValueError, match="`rounds` must be an int >= 1; got 0"):
        compare(make_state, SCCE, data, rounds=0)
    with pytest.raises(TypeError, match=r"`data` must be a tf\.data\.Dataset of batches; got list"):
        compare(make_state, SCCE, list(data))
    with pytest.raises(KeyError, match="No variant 'xla' was measured"):
        BenchResult(rounds={"graph": (1.0,)}, steps={"graph": 1}).paired("xla", "graph")
    assert MADE == []


def test_without_matplotlib_the_chart_is_refused_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = BenchResult(rounds={"graph": (1e-3,)}, steps={"graph": 1})
    with pytest.raises(ImportError, match=r'needs matplotlib: pip install "tfpure\[bench\]"'):
        result.plot("chart.png")


def test_the_command_line_on_the_example_file_prints_the_table_and_draws(tmp_path, capsys):
    example = str(Path(__file__).parents[1] / "examples" / "bench_cnn.py")
    args = [f"{example}:make_state", f"{example}:make_data", "--loss", "mse"]
    with pytest.raises(SystemExit, match=r"expected module:name or file\.py:name"):
        main(["make_state", *args[1:]])
    result = main(
        [
            *args[:2],
            "--loss",
            "sparse_categorical_crossentropy",
            "--variants",
            "graph,fused",
            "--rounds",
            "1",
            "--steps",
            "4",
            "--chart",
            str(tmp_path / "chart.png"),
        ]
    )
    out = capsys.readouterr().out
    assert result.steps == {"graph": 4, "fused": 16}
    assert "| graph |" in out and "| fused |" in out and "1 round after 1 warm-up" in out
    assert (tmp_path / "chart.png").stat().st_size > 0 and f"chart: {tmp_path}" in out


def test_an_auto_variant_chooses_in_the_warm_up_and_says_what_it_chose():
    MADE.clear()
    result = compare(
        make_state,
        SCCE,
        make_data(),
        variants={
            "graph": tp.bench.Variant(steps_per_call=1),
            "auto": tp.bench.Variant(steps_per_call="auto"),
        },
        rounds=2,
        steps=20,
    )
    assert result.chosen["auto"] in [(False, 1), (False, 16)] and "graph" not in result.chosen
    assert result.steps == {"graph": 20, "auto": 16}  # whole calls of either candidate
    # The trial's steps were put back: the state ran the warm-up and the 2 rounds only.
    assert steps_taken(MADE[1]) == 3 * 16
    assert f"| auto (chose jit_compile=False, steps_per_call={result.chosen['auto'][1]}) |" in (
        result.to_markdown()
    )
    with pytest.raises(ValueError, match="a Keras, hand-written or eager variant has none"):
        compare(make_state, SCCE, make_data(),
                variants={"k": tp.bench.Variant(keras=True, jit_compile="auto")})  # fmt: skip
