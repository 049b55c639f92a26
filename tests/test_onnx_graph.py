"""The ONNX generator of `onnx_graph` against G's own inference, in onnxruntime, for every
kind of G; and its refusal of layers and variables it does not export."""

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from flax import linen as nn

from dcgan_jax import onnx_graph, strided_conv
from dcgan_jax.models import Generator

ort = pytest.importorskip("onnxruntime")

NZ = 8
NUM_CLASSES = 5
CASES = {
    "32": dict(resolution=32),
    "64_gray": dict(resolution=64, channels=1),
    "32_msg": dict(resolution=32, msg=True),
    "32_concat": dict(resolution=32, num_classes=NUM_CLASSES, cond="concat"),
    "32_cbn_gray": dict(resolution=32, channels=1, num_classes=NUM_CLASSES, cond="cbn"),
    "32_msg_portable": dict(resolution=32, msg=True, upsample=strided_conv.PortableUpsampleConv),
}


def generator(case):
    return Generator(base_channels=8, **CASES[case])


def labels_of(g, batch):
    return jnp.arange(batch, dtype=jnp.int32) % g.num_classes if g.num_classes else None


def random_variables(g, seed=0):
    """G's variables made random: BatchNorm statistics away from 0 and 1, every parameter
    (kernels, scales, biases, embeddings) moved off its initial value."""
    rng = np.random.default_rng(seed)
    variables = g.init(jax.random.PRNGKey(seed), jnp.zeros((1, NZ)), labels_of(g, 1),
                       train=False)

    def randomize(path, x):
        name = path[-1].key
        if name == "mean":
            return rng.normal(0.0, 0.5, x.shape).astype(np.float32)
        if name == "var":
            return rng.uniform(0.5, 2.0, x.shape).astype(np.float32)
        return np.asarray(x) + rng.normal(0.0, 0.1, x.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(randomize, variables)


@pytest.mark.parametrize("case", CASES)
def test_onnx_generator_equals_inference(case):
    g = generator(case)
    variables = random_variables(g)
    model = onnx_graph.generator_model(g, variables, NZ)
    onnx.checker.check_model(model, full_check=True)
    assert model.graph.name == "dcgan_jax_generator"
    assert "dcgan_jax generator" in model.doc_string
    assert [i.name for i in model.graph.input] == ["z", "label"][:1 + bool(g.num_classes)]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        z = jax.random.normal(jax.random.PRNGKey(batch), (batch, NZ))
        labels = labels_of(g, batch)
        feeds = {"z": np.asarray(z)}
        if labels is not None:
            feeds["label"] = np.asarray(labels)
        (images,) = session.run(["images"], feeds)
        expected = np.asarray(g.apply(variables, z, labels, train=False)[0])
        assert images.shape == expected.shape == (batch, g.resolution, g.resolution,
                                                  g.channels)
        # Not saturated by tanh, so that the comparison means something.
        assert np.mean(np.abs(expected) < 0.9) > 0.5
        np.testing.assert_allclose(images, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_every_layer_type_of_g_has_an_emitter(case):
    types = onnx_graph.generator_layer_types(generator(case), NZ)
    assert types <= set(onnx_graph.LAYERS)
    assert nn.BatchNorm in types


def test_unexported_variable_is_named():
    g = generator("32")
    variables = random_variables(g)
    variables["params"]["Extra_0"] = {"kernel": np.zeros((3, 3), np.float32)}
    with pytest.raises(onnx_graph.UnknownLayerError, match="params/Extra_0/kernel") as error:
        onnx_graph.generator_model(g, variables, NZ)
    assert "\n" not in str(error.value)
    assert isinstance(error.value, ValueError)


def test_layer_type_missing_from_layers_is_named(monkeypatch):
    g = generator("32_cbn_gray")
    monkeypatch.delitem(onnx_graph.LAYERS, nn.Embed)
    with pytest.raises(onnx_graph.UnknownLayerError, match=r"Embed \(at ClassBatchNorm_0/"):
        onnx_graph.generator_model(g, random_variables(g), NZ)
