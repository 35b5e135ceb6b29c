"""Every private TensorFlow / Keras API tfpure uses (tfpure.compat), checked against the
installed versions: an upgrade that changes one fails here, loudly, not silently elsewhere."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpure as tp
from tfpure import compat
from tfpure.testing.strategies import ModelSpec


def test_loss_function_wrapper_scores_a_plain_function_as_compile_does():
    def per_sample(y_true, y_pred):
        return tf.reduce_mean(tf.square(y_true - y_pred), axis=-1)

    wrapped = compat.LossFunctionWrapper(per_sample, name="per_sample")
    assert isinstance(wrapped, keras.losses.Loss)
    y, p = np.zeros((4, 2), "float32"), np.arange(8, dtype="float32").reshape(4, 2)
    w = np.array([1.0, 0.0, 2.0, 1.0], "float32")
    expected = np.sum(np.mean((y - p) ** 2, axis=-1) * w) / 4  # sum_over_batch_size
    assert float(wrapped(y, p, sample_weight=w)) == pytest.approx(expected, rel=1e-6)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    model.compile(loss=per_sample)
    assert float(model.compute_loss(y=y, y_pred=p, sample_weight=w)) == pytest.approx(
        expected, rel=1e-6
    )


def test_optimizer_built_for_lists_exactly_the_variables_it_was_built_on():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.Dense(1)])
    optimizer = keras.optimizers.Adam()
    assert compat.optimizer_built_for(optimizer) == []
    optimizer.build(model.trainable_variables)
    assert [id(v) for v in compat.optimizer_built_for(optimizer)] == [
        id(v) for v in model.trainable_variables
    ]


def test_flatten_layers_reaches_nested_layers():
    inner = keras.Sequential([keras.layers.Dense(2, name="deep")], name="inner")
    model = keras.Sequential([keras.Input((3,)), inner, keras.layers.Dropout(0.5, name="drop")])
    names = [layer.name for layer in compat.flatten_layers(model, include_self=False)]
    assert "deep" in names and "drop" in names and model.name not in names


def test_seed_generators_are_the_ones_dropout_draws_from():
    model = keras.Sequential([keras.Input((50,)), keras.layers.Dropout(0.5)])
    (generator,) = compat.seed_generators(model)
    assert isinstance(generator, keras.random.SeedGenerator)
    x = np.ones((4, 50), "float32")
    generator.state.assign(tf.constant([7, 0], tf.int64))
    first = model(x, training=True).numpy()
    generator.state.assign(tf.constant([7, 0], tf.int64))
    np.testing.assert_array_equal(model(x, training=True).numpy(), first)  # same seed, same mask
    # ...and TrainState.create(seed=) reseeds it, reproducibly.
    masks = []
    for _ in range(2):
        m = keras.Sequential([keras.Input((50,)), keras.layers.Dropout(0.5)])
        tp.TrainState.create(
            model=keras.Sequential([m, keras.layers.Dense(1)]),
            optimizer=keras.optimizers.SGD(),
            seed=3,
        )
        masks.append(m(x, training=True).numpy())
    np.testing.assert_array_equal(masks[0], masks[1])


def test_model_input_structure_of_a_functional_dict_model():
    a, b = keras.Input((2,), name="a"), keras.Input((3,), name="b")
    model = keras.Model({"a": a, "b": b}, keras.layers.Concatenate()([a, b]))
    structure = compat.model_input_structure(model)
    assert isinstance(structure, dict) and sorted(structure) == ["a", "b"]
    sequential = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    assert [tuple(t.shape) for t in compat.model_input_structure(sequential)] == [(None, 4)]


def test_is_functional_tells_functional_models_from_sequential_and_subclassed_ones():
    x = keras.Input((2,))
    assert compat.is_functional(keras.Model(x, keras.layers.Dense(1)(x)))
    assert not compat.is_functional(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]))
    assert not compat.is_functional(keras.Model())  # subclassed (no graph)


def test_flat_caller_calls_the_concrete_function_through_call_flat():
    @tf.function
    def total(iterator, limit):
        return tf.reduce_sum(iterator.get_next()) + tf.cast(limit, tf.float32)

    iterator = iter(tf.data.Dataset.from_tensors(tf.ones([3])).repeat())
    concrete = total.get_concrete_function(iterator, tf.TensorSpec([], tf.int32))
    assert callable(getattr(concrete, "_call_flat", None))  # the fast path is taken
    call = compat.flat_caller(concrete, iterator)
    assert float(call(tf.constant(2))) == 5.0
    counter = tf.Variable(0)
    bare = compat.flat_caller(tf.function(lambda: counter.assign_add(3)).get_concrete_function())
    assert [int(bare()) for _ in range(2)] == [3, 6]  # the captured variable, not a copy


def test_serialized_dataset_graph_refuses_external_state():
    graph = compat.serialized_dataset_graph(tf.data.Dataset.range(4).shuffle(4, seed=1))
    assert graph.dtype == tf.string and b"ShuffleDataset" in graph.numpy()
    outside = tf.data.Dataset.range(4).map(lambda i: tf.py_function(lambda t: t, [i], tf.int64))
    with pytest.raises(tf.errors.OpError):
        compat.serialized_dataset_graph(outside)


def test_sliced_arrays_and_endless_source_see_through_the_tutorials_pipeline():
    """The private attributes it reads are there (the tutorial's pipeline is recognised,
    its very tensors found), and any other data is not taken for arrays."""
    x, y = np.arange(30.0, dtype="float32").reshape(10, 3), np.arange(10)
    source = tf.data.Dataset.from_tensor_slices({"x": x, "y": y})
    for data in (source.batch(4), source.batch(4).prefetch(tf.data.AUTOTUNE)):
        arrays, size = compat.sliced_arrays(data)
        assert size == 4 and sorted(arrays) == ["x", "y"]
        np.testing.assert_array_equal(arrays["x"], x)
        np.testing.assert_array_equal(arrays["y"], y)
    for other in (
        source.shuffle(10, seed=1).batch(4),  # an order of its own
        source.batch(4, drop_remainder=True),
        source.batch(4).map(lambda d: d),
        source.batch(4).take(2),
        source.batch(4).repeat(),  # (repeated: `endless_source`)
        tf.data.Dataset.range(10).batch(4),
        tf.data.Dataset.from_tensor_slices(tf.ragged.constant([[1], [2, 3]])).batch(2),
    ):
        assert compat.sliced_arrays(other) is None
    batches = source.batch(4)
    assert compat.endless_source(batches.repeat()) is batches
    assert compat.endless_source(batches.repeat(2)) is None
    assert compat.endless_source(batches) is None


def test_supports_no_merge_call_tells_strategies_apart():
    assert compat.supports_no_merge_call() is True
    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        assert compat.supports_no_merge_call() is False


def test_a_missing_private_api_fails_loudly_instead_of_skipping():
    class NotALayer:
        pass

    with pytest.raises(compat.PrivateAPIChanged, match="_flatten_layers"):
        compat.seed_generators(NotALayer())
    with pytest.raises(compat.PrivateAPIChanged, match="_as_serialized_graph"):
        compat.serialized_dataset_graph(NotALayer())


def test_keras_random_algorithm_draws_keras_random_ops_with_threefry_and_puts_them_back():
    import keras.src.backend.tensorflow.random as backend_random

    x = tf.ones((16, 32))

    a, b = keras.random.SeedGenerator(7), keras.random.SeedGenerator(7)

    @tf.function(jit_compile=True)
    def draws():
        with compat.keras_random_algorithm("threefry"):
            got = keras.random.dropout(x, 0.5, seed=a), keras.random.normal((5,), seed=a)
        seed = backend_random._cast_seed(backend_random.draw_seed(b))
        expected = tf.nn.experimental.stateless_dropout(x, 0.5, seed=seed, rng_alg="threefry")
        seed = backend_random._cast_seed(backend_random.draw_seed(b))
        return got, (expected, tf.random.stateless_normal((5,), seed, alg="threefry"))

    (mask, normal), (expected_mask, expected_normal) = draws()
    np.testing.assert_array_equal(mask.numpy(), expected_mask.numpy())
    np.testing.assert_array_equal(normal.numpy(), expected_normal.numpy())
    assert 0.3 < float(np.mean(mask.numpy() == 0)) < 0.7
    assert backend_random.dropout.__module__ == backend_random.__name__  # put back


def test_xla_steps_draw_dropout_with_threefry_reproducibly():
    """The XLA step equals a hand-written XLA step whose Dropout draws with threefry, and
    two states with one seed train alike (the masks are functions of the seed state)."""
    spec = ModelSpec((5,), (("dense", 16), ("dropout", 50)), 3)
    x, y = spec.batch(8, 0)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def state():
        return tp.TrainState.create(
            model=spec.build(0), optimizer=keras.optimizers.SGD(0.1), seed=3
        )

    mine, again, reference = state(), state(), state()
    step = tp.make_train_step(loss, jit_compile=True, nonfinite=None)

    @tf.function(jit_compile=True)
    def hand_written(x, y):
        with compat.keras_random_algorithm("threefry"), tf.GradientTape() as tape:
            value = loss(y, reference.model(x, training=True))
        variables = reference.model.trainable_variables
        reference.optimizer.apply_gradients(
            zip(tape.gradient(value, variables), variables, strict=True)
        )

    for _ in range(3):
        mine, _ = step(mine, (x, y))
        again, _ = step(again, (x, y))
        hand_written(x, y)
    for a, b, c in zip(
        mine.model.weights, again.model.weights, reference.model.weights, strict=True
    ):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        np.testing.assert_allclose(a.numpy(), c.numpy(), rtol=1e-6, atol=1e-7)


def test_an_xla_step_run_eagerly_draws_as_the_eager_step_does():
    spec = ModelSpec((5,), (("dense", 16), ("dropout", 50)), 3)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    state = tp.TrainState.create(model=spec.build(0), optimizer=keras.optimizers.SGD(), seed=1)
    tf.config.run_functions_eagerly(True)
    try:  # threefry has no eager CPU kernel: the step must not ask for it
        state, logs = tp.make_train_step(loss, jit_compile=True)(state, spec.batch(4, 0))
    finally:
        tf.config.run_functions_eagerly(False)
    assert np.isfinite(float(logs["loss"])) and int(state.step) == 1


def test_dataset_op_inputs_reads_seeds_and_batch_size_by_name():
    from tfpure.resume import _dataset_graph

    data = tf.data.Dataset.range(10).shuffle(4, seed=3).batch(5)
    graph, const = _dataset_graph(data)
    ops = {node.op.rstrip("V0123456789"): node for node in graph}
    shuffle = compat.dataset_op_inputs(ops["ShuffleDataset"])
    batch = compat.dataset_op_inputs(ops["BatchDataset"])
    assert const(batch["batch_size"]) == 5
    # tf.data derives the op's seeds from the global seed and the one given: not both 0.
    assert (const(shuffle["seed"]), const(shuffle["seed2"])) != (0, 0)
    unknown = tf.compat.v1.NodeDef(op="NoSuchDataset", input=["a"])
    short = tf.compat.v1.NodeDef(op=ops["ShuffleDataset"].op, input=["a", "b"])
    assert compat.dataset_op_inputs(unknown) is None
    assert compat.dataset_op_inputs(short) is None


def test_the_replay_check_fails_closed_on_a_shuffle_it_cannot_read(tmp_path, monkeypatch):
    from tfpure import resume

    monkeypatch.setattr(resume, "dataset_op_inputs", lambda node: None)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD())
    data = tf.data.Dataset.from_tensor_slices((tf.ones((8, 2)), tf.ones((8, 1))))
    data = data.shuffle(8, seed=1).batch(4)
    before = [v.numpy() for v in model.variables]
    with pytest.raises(tp.CheckpointError, match=r"cannot read the seeds of its ShuffleDataset"):
        tp.fit_loop(state, data, tp.make_train_step("mse"), verbose=0,
                    checkpoint=tp.Checkpointer(tmp_path))  # fmt: skip
    for a, b in zip(model.variables, before, strict=True):
        np.testing.assert_array_equal(a.numpy(), b)
    monkeypatch.undo()  # read by name, the same pipeline is replayable
    tp.fit_loop(state, data, tp.make_train_step("mse"), verbose=0,
                checkpoint=tp.Checkpointer(tmp_path))  # fmt: skip
    assert int(state.step) == 2


def test_checkpoint_value_key_is_where_a_checkpoint_keeps_a_variable(tmp_path):
    path = tf.train.Checkpoint(layout=tf.Variable("saved text")).write(str(tmp_path / "c"))
    reader = tf.train.load_checkpoint(path)
    assert reader.get_tensor(compat.checkpoint_value_key("layout")) == b"saved text"


def test_keras_losses_in_float64_computes_the_loss_in_float64_and_puts_call_back():
    y, p = np.zeros((2, 1)), np.full((2, 1), 1e-5)
    loss = keras.losses.MeanSquaredError()
    with compat.keras_losses_in_float64():
        inside = loss(tf.constant(y), tf.constant(p))
    # float32 would round the square (1e-10) to about 7 digits
    assert inside.dtype == tf.float64
    assert float(inside) == pytest.approx(np.mean((y - p) ** 2), rel=1e-12)
    assert loss(tf.constant(y), tf.constant(p)).dtype == tf.float32


def test_the_random_swap_refuses_a_keras_function_of_other_parameters(monkeypatch):
    import keras.src.backend.tensorflow.random as backend_random

    uniform = backend_random.uniform
    monkeypatch.setattr(backend_random, "normal", lambda shape, seed=None: None)
    with pytest.raises(compat.PrivateAPIChanged, match=r"random\.normal .*\['shape', 'seed'\]"):  # noqa: SIM117
        with compat.keras_random_algorithm("threefry"):
            pass
    assert backend_random.uniform is uniform  # nothing was swapped


def test_branch_keeps_the_guards_if_op_functional_and_takes_the_right_branch():
    """The put-back branch of a guarded step is an unlowered `If` (no `Switch` per captured
    variable), and still puts a failed step back."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    state = tp.TrainState.create(model=model, optimizer=keras.optimizers.SGD(0.1))
    step = tp.make_train_step("mse", nonfinite="skip")
    x, y = np.ones((2, 2), "float32"), np.ones((2, 1), "float32")
    before = [v.numpy() for v in model.weights]
    state, logs = step(state, (x * np.nan, y))
    assert int(logs["skipped"]) == 1
    for v, value in zip(model.weights, before, strict=True):
        np.testing.assert_array_equal(v.numpy(), value)
    specs = (tf.TensorSpec([None, 2], tf.float32), tf.TensorSpec([None, 1], tf.float32))
    graph = step.engine(state).on_batch.get_concrete_function(specs).graph
    lowered = [
        op.get_attr("_lower_using_switch_merge")
        for op in graph.get_operations()
        if op.type in ("If", "StatelessIf")
    ]
    assert lowered == [False, False]  # the failure record's branch and the put-back's
