"""The same loop on tf.distribute: Mirrored and MultiWorkerMirrored strategies equal one device."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpure as tp
from tfpure.testing.strategies import ModelSpec

from reference import twin

WORKER = Path(__file__).with_name("distributed_worker.py")
SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def run(*args):
    done = subprocess.run(
        [sys.executable, str(WORKER), *map(str, args)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_workers(out_dir, jobs):
    """`--fork` specs of two MultiWorkerMirroredStrategy workers on 127.0.0.1, each running
    `jobs` (option lists) one after the other; worker i's j-th run writes w{i}-{j}.npz.
    (By hand: ``python tests/distributed_worker.py --fork SPEC0 SPEC1``.)"""
    workers = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    specs = []
    for index in range(2):
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        (out_dir / f"w{index}-config.json").write_text(json.dumps(config))
        path = out_dir / f"w{index}-jobs.json"
        path.write_text(
            json.dumps([[str(out_dir / f"w{index}-{j}.npz"), o] for j, o in enumerate(jobs)])
        )
        specs.append(f"multiworker:{path}@{out_dir / f'w{index}-config.json'}")
    return specs


def load(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def assert_same_run(got, expected, replicas):
    assert int(got["replicas"]) == replicas and int(expected["replicas"]) == 1
    assert int(got["step"]) == int(expected["step"])
    assert int(got["skipped"]) == int(expected["skipped"])
    for name in expected:
        if name not in ("replicas", "trained"):
            np.testing.assert_allclose(got[name], expected[name], **TOLERANCE, err_msg=name)


def jobs_file(mode, jobs, directory):
    path = directory / f"{mode}-jobs.json"
    path.write_text(json.dumps([[str(out), list(options)] for out, options in jobs]))
    return f"{mode}:{path}"


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """The one-device references, the two-replica runs and two multi-worker workers: four
    children of one process."""
    base = tmp_path_factory.mktemp("distribute")
    ckpt = str(base / "ckpt")
    single = jobs_file(
        "single",
        [
            (base / "single.npz", []),
            (base / "single-nan.npz", ["--nan-batch", "2"]),
            (base / "single-gan.npz", ["--gan"]),
            (base / "single-two.npz", ["--two-outputs", "--epochs", "2"]),
        ],
        base,
    )
    mirrored = jobs_file(
        "mirrored",
        [
            (base / "mirrored-nan.npz", ["--nan-batch", "2", "--steps-per-call", "3"]),
            (base / "mirrored-gan.npz", ["--gan", "--steps-per-call", "3"]),
            (base / "mirrored-diagnose.npz", ["--diagnose"]),
            (base / "mirrored-two.npz", ["--two-outputs", "--epochs", "2"]),
            (base / "mirrored-first.npz", ["--epochs", "2", "--checkpoint", ckpt]),
            (base / "mirrored-resumed.npz", ["--epochs", "3", "--checkpoint", ckpt]),
        ],
        base,
    )
    # The chief writes the checkpoints, both workers restore from them: 2 epochs, then the
    # same run asked for 3 resumes at epoch 2 (the workers' second run).
    together = str(base / "mw-ckpt")
    jobs = [
        ["--epochs", "2", "--checkpoint", together],
        ["--epochs", "3", "--checkpoint", together],
    ]
    run("--fork", single, mirrored, *two_workers(base, jobs))
    return base


def test_mirrored_equals_one_device_with_fused_calls_and_a_skipped_batch(runs):
    """Two replicas, a 3/2 split of the ragged last batch, validation, steps_per_call=3,
    and a non-finite batch skipped on both sides."""
    expected = load(runs / "single-nan.npz")
    assert int(expected["skipped"]) == 3  # one per epoch
    assert_same_run(load(runs / "mirrored-nan.npz"), expected, replicas=2)


def test_compile_style_losses_and_metrics_on_two_replicas_equal_one_device(runs):
    """Per-output losses (each output's, reported), loss weights, metrics and weighted metrics
    on sample-weighted batches; the ragged last batch splits 3/2 and counts once."""
    expected, got = load(runs / "single-two.npz"), load(runs / "mirrored-two.npz")
    assert list(expected["keys"]) == [
        "kind_accuracy", "kind_loss", "loss", "size_loss", "size_mae",
        "val_kind_accuracy", "val_kind_loss", "val_loss", "val_size_loss", "val_size_mae",
    ]  # fmt: skip
    assert list(got.pop("keys")) == list(expected.pop("keys"))
    assert_same_run(got, expected, replicas=2)


def test_a_two_state_make_step_body_on_two_replicas_equals_one_device(runs):
    """A GAN body (replica_mean losses), a 3/2 split of the ragged last batch, fused calls,
    and an action at exact steps."""
    expected, got = load(runs / "single-gan.npz"), load(runs / "mirrored-gan.npz")
    assert set(got["traced"]) == {2} and set(expected["traced"]) == {1}
    assert int(got["replicas"]) == 2
    assert int(got["gstep"]) == int(expected["gstep"]) == 3 * 8
    # An action every 5 steps: exact steps across fused calls, examples counted per global batch.
    np.testing.assert_array_equal(got["fired"][:, 0], [5, 10, 15, 20])
    np.testing.assert_array_equal(got["fired"][:, 0], got["fired"][:, 1])
    assert ((got["fired"][:, 2] >= 5) & (got["fired"][:, 2] <= 8)).all()
    for name in expected:
        if name not in ("replicas", "traced"):
            np.testing.assert_allclose(got[name], expected[name], **TOLERANCE, err_msg=name)


def test_a_nan_in_one_replicas_shard_is_named_and_every_replicas_copy_is_put_back(runs):
    got = load(runs / "mirrored-diagnose.npz")
    message = str(got["message"])
    assert message.startswith("at step 1 (0-based) the replicas' losses were [")
    assert re.search(r", nan\]; replica 1: non-finite gradients of \['sequential\w*/dense", message)
    assert "replica 0: non-finite" not in message
    assert bool(got["differed"]), "the replicas' BatchNorm statistics were equal: no evidence"
    assert bool(got["unchanged"]) and int(got["step"]) == 1


def test_mirrored_checkpoint_resume_equals_one_device(runs):
    assert_same_run(load(runs / "mirrored-resumed.npz"), load(runs / "single.npz"), replicas=2)


def test_multiworker_with_checkpoint_resume_equals_one_device(runs):
    """The chief writes the checkpoints, both workers restore from them (`runs`)."""
    assert sorted(os.listdir(runs / "mw-ckpt")) == [
        ".tfpure.lock",  # the chief's: one writer per directory
        "checkpoint",
        *sorted(
            f"ckpt-{n}.{suffix}" for n in (8, 16, 24) for suffix in ("data-00000-of-00001", "index")
        ),
    ]  # the chief's files only: the other worker's copies are gone
    first, resumed = load(runs / "w0-0.npz"), load(runs / "w0-1.npz")
    assert int(first["step"]) == 16 and int(resumed["trained"]) == 8  # resumed, not retrained
    assert_same_run(resumed, load(runs / "single.npz"), replicas=2)


# -- in-process: one-replica strategies and refusals ------------------------------------

SPEC = ModelSpec((5,), (("dense", 6), ("batchnorm", 0)), num_classes=3, l2=0.01)


def dataset():
    return tf.data.Dataset.from_tensor_slices(SPEC.batch(21, 0)).batch(8)


@pytest.mark.parametrize(
    "strategy",
    [
        pytest.param(lambda: tf.distribute.OneDeviceStrategy("/cpu:0"), id="one-device"),
        pytest.param(lambda: tf.distribute.MirroredStrategy(["/cpu:0"]), id="mirrored-1"),
    ],
)
def test_one_replica_strategies_equal_the_plain_path(strategy):
    model = SPEC.build(0)
    plain = tp.TrainState.create(model=model, optimizer=keras.optimizers.Adam(0.01))
    strategy = strategy()
    with strategy.scope():
        copy = keras.models.clone_model(model)
        distributed = tp.TrainState.create(model=copy, optimizer=keras.optimizers.Adam(0.01))
    for a, b in zip(model.variables, copy.variables, strict=True):
        b.assign(a.value)
    assert distributed.strategy is strategy
    _, h_plain = tp.fit_loop(plain, dataset(), tp.make_train_step(SCCE), epochs=2, verbose=0)
    _, h_dist = tp.fit_loop(distributed, dataset(), tp.make_train_step(SCCE), epochs=2, verbose=0)
    np.testing.assert_allclose(h_dist["loss"], h_plain["loss"], rtol=1e-5)
    _, logs = tp.make_train_step(SCCE)(distributed, SPEC.batch(5, 1))  # a single batch
    _, plain_logs = tp.make_train_step(SCCE)(plain, SPEC.batch(5, 1))
    assert float(logs["loss"]) == pytest.approx(float(plain_logs["loss"]), rel=1e-5)
    for a, b in zip(model.variables, copy.variables, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)


def test_nonfinite_raise_under_a_strategy_changes_nothing():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        state = tp.TrainState.create(model=SPEC.build(0), optimizer=keras.optimizers.Adam())
    x, y = SPEC.batch(6, 0)
    x[1] = np.nan
    before = [v.numpy() for v in state.model.variables]
    with pytest.raises(tp.NonFiniteError, match="at step 0"):
        tp.make_train_step(SCCE)(state, (x, y))
    for v, b in zip(state.model.variables, before, strict=True):
        np.testing.assert_array_equal(v.numpy(), b, err_msg=v.path)


def test_a_model_built_outside_the_scope_is_refused():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    outside = SPEC.build(0)
    with strategy.scope(), pytest.raises(ValueError, match="outside its scope"):
        tp.TrainState.create(model=outside, optimizer=keras.optimizers.SGD())
    with strategy.scope():
        inside = twin(outside)
    with pytest.raises(ValueError, match=r"inside the same `with strategy\.scope"):
        tp.TrainState.create(model=inside, optimizer=keras.optimizers.SGD())


def test_xla_under_mirrored_strategy_is_refused_clearly():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        state = tp.TrainState.create(model=SPEC.build(0), optimizer=keras.optimizers.SGD())
    with pytest.raises(
        ValueError, match="jit_compile=True is not supported under MirroredStrategy"
    ):
        tp.make_train_step(SCCE, jit_compile=True)(state, SPEC.batch(4, 0))
