"""tfpure: functional, graph-compiled, property-tested training loops for Keras 3.

The hand-written TensorFlow loop (GradientTape, ``apply_gradients``, metric
``update_state``/``reset_state``, ``training=``, ``model.losses``,
``@tf.function``) as a few composable pieces::

    state = tp.TrainState.create(model=model, optimizer=keras.optimizers.Adam())
    train_step = tp.make_train_step(loss)
    state, logs = train_step(state, (x, y))
    state, history = tp.fit_loop(state, train_ds, train_step, epochs=5, val_data=val_ds)
"""

from tfpure import distribute, transforms
from tfpure._version import __version__ as __version__
from tfpure.batch import LossFn, ModelLossFn
from tfpure.checkpoint import Checkpointer, CheckpointError
from tfpure.custom import log_if
from tfpure.loop import evaluate, fit_loop, fold
from tfpure.predict import predict
from tfpure.resume import Preempted
from tfpure.schedule import Action, every, tensorboard_writer
from tfpure.state import TrainState, ema
from tfpure.steps import (
    AutoStep,
    GradTransform,
    Logs,
    NonFiniteError,
    Step,
    StepFn,
    StepSpec,
    make_eval_step,
    make_step,
    make_train_step,
)


def __getattr__(name: str):  # `tp.bench` on first use: `python -m tfpure.bench` runs it afresh.
    if name == "bench":
        import tfpure.bench

        return tfpure.bench
    raise AttributeError(f"module 'tfpure' has no attribute {name!r}")


__all__ = [
    "Action",
    "AutoStep",
    "CheckpointError",
    "Checkpointer",
    "GradTransform",
    "Logs",
    "LossFn",
    "ModelLossFn",
    "NonFiniteError",
    "Preempted",
    "Step",
    "StepFn",
    "StepSpec",
    "TrainState",
    "ema",
    "evaluate",
    "every",
    "fit_loop",
    "fold",
    "log_if",
    "make_eval_step",
    "make_step",
    "make_train_step",
    "predict",
    "tensorboard_writer",
    "bench",
    "distribute",
    "transforms",
]
