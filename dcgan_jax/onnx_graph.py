"""The generator as an ONNX graph, written layer by layer with `onnx.helper`.

ONNX converters (jax2onnx, tf2onnx through jax2tf) fail on this stack, while G has only a few
kinds of layers, each a few ONNX operators: `LAYERS` maps every flax module type that G calls
to the function that emits its nodes. The builder follows `Generator.__call__`, reads each
layer's variables by its Flax name and fails, naming them, on any variable or layer of G it
did not export (MSG's side outputs excepted), so a new layer cannot be forgotten.

ONNX computes in NCHW: z becomes a 1x1 image, and the images are transposed to NHWC last.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from flax import linen as nn
from flax import traverse_util
from onnx import TensorProto, helper, numpy_helper

from dcgan_jax import models, strided_conv
from dcgan_jax.errors import UserFacingError

Path = tuple[str, ...]
# The ONNX operator set the graph declares: ConvTranspose, BatchNormalization, Gather and the
# activations as onnxruntime and other runtimes of the last years read them.
OPSET = 17


class UnknownLayerError(UserFacingError, ValueError):
    """G has a layer type without an emitter in `LAYERS`, or variables no emitter read."""


def _name(key: Path) -> str:
    return "/".join(key) or "<root>"


def _traced_modules(generator: models.Generator, nz: int) -> dict[Path, nn.Module]:
    """Every module G calls, by its Flax path, from an abstract call in inference mode."""
    modules: dict[Path, nn.Module] = {}

    def record(next_fun, args, kwargs, context):
        modules.setdefault(context.module.path, context.module)
        return next_fun(*args, **kwargs)

    z = jnp.zeros((1, nz), jnp.float32)
    labels = jnp.zeros((1,), jnp.int32) if generator.num_classes else None
    with nn.intercept_methods(record):
        jax.eval_shape(lambda: generator.init(jax.random.PRNGKey(0), z, labels, train=False))
    return modules


def generator_layer_types(generator: models.Generator, nz: int) -> set[type]:
    """The flax module types G calls (G's own included): each needs an entry in LAYERS."""
    return {type(module) for module in _traced_modules(generator, nz).values()}


class _Graph:
    """The nodes and initializers built so far, G's modules by path, and which modules and
    variable leaves the emitters have not used yet."""

    def __init__(self, modules: dict[Path, nn.Module], variables: Mapping[str, Any],
                 labels: str | None):
        self.modules = modules
        self.labels = labels  # The name of the int class labels [N], if G takes them.
        self.leaves = traverse_util.flatten_dict(dict(variables))
        self.unused = set(self.leaves)
        self.unvisited = set(modules)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.node_names: set[str] = set()
        # Reshapes [N, C] to [N, C, 1, 1] (0 copies N).
        self.column = self.initializer("nchw_1x1_shape", np.array([0, -1, 1, 1], np.int64))

    def layer(self, path: Path, x: str) -> str | None:
        """The output of the layer at `path` on input `x`, by its emitter in LAYERS."""
        if path not in self.modules:
            raise UnknownLayerError(f"G made no layer {_name(path)}: onnx_graph's builder no "
                                    f"longer follows Generator.__call__")
        self.unvisited.discard(path)
        module = self.modules[path]
        return LAYERS[type(module)](self, module, path, x)

    def variable(self, collection: str, path: Path, name: str) -> np.ndarray:
        """The float32 value of variable `collection/path/name`, marked as exported."""
        key = (collection, *path, name)
        if key not in self.leaves:
            raise ValueError(f"G's variables have no {_name(key)}")
        self.unused.discard(key)
        return np.asarray(self.leaves[key], np.float32)

    def skip(self, path: Path) -> None:
        """Marks the variables of the module at `path` as knowingly not exported."""
        self.unused = {key for key in self.unused if key[1:len(path) + 1] != path}

    def initializer(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], path: Path, output: str | None = None,
             **attributes: Any) -> str:
        """Adds an `op` node named after the layer at `path`; returns its output's name."""
        name, n = _name((*path, op)), 1
        while name in self.node_names:
            name, n = _name((*path, f"{op}_{n}")), n + 1
        self.node_names.add(name)
        output = output or name
        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attributes))
        return output

    def check_complete(self) -> None:
        """Raises UnknownLayerError naming the modules and variables not exported."""
        missing = [f"layer {_name(path)}" for path in sorted(self.unvisited)]
        missing += [f"variable {_name(key)}" for key in sorted(self.unused)]
        if missing:
            raise UnknownLayerError(f"G's {', '.join(missing)} not exported: onnx_graph's "
                                    f"builder and LAYERS do not cover them")


def _generator(graph: _Graph, g: models.Generator, path: Path, z: str) -> str:
    """Generator.__call__ in inference mode, less MSG's side outputs: NCHW images."""
    blocks = models.num_blocks(g.resolution)
    norm = "ClassBatchNorm" if g.num_classes and g.cond == "cbn" else "BatchNorm"
    if g.num_classes and g.cond == "concat":
        embedding = graph.layer((*path, "class_embedding"), graph.labels)
        z = graph.node("Concat", [z, embedding], (*path, "class_embedding"), axis=1)
    x = graph.node("Reshape", [z, graph.column], path)

    def block(x: str, index: int) -> str:
        x = graph.layer((*path, f"ConvTranspose_{index}"), x)
        x = graph.layer((*path, f"{norm}_{index}"), x)
        return graph.node("Relu", [x], (*path, f"{norm}_{index}"))

    x = block(x, 0)
    for index in range(1, blocks):
        if g.msg:
            graph.layer((*path, f"Conv_{index - 1}"), x)
        x = block(x, index)
    if g.msg:
        graph.layer((*path, f"Conv_{blocks - 1}"), x)
    x = graph.layer((*path, f"ConvTranspose_{blocks}"), x)
    return graph.node("Tanh", [x], path)


def _conv_transpose_nodes(graph: _Graph, path: Path, x: str, strides: list[int],
                          pads: list[int]) -> str:
    """PyTorch's ConvTranspose2d from a kernel [kh, kw, out, in] (of the strided convolution
    it is the adjoint of): ONNX's weight is [in, out, kh, kw], with no spatial flip."""
    kernel = graph.variable("params", path, "kernel")
    weight = graph.initializer(_name((*path, "kernel")), kernel.transpose(3, 2, 0, 1).copy())
    return graph.node("ConvTranspose", [x, weight], path, kernel_shape=list(kernel.shape[:2]),
                      strides=strides, pads=pads)


def _flax_conv_transpose(graph: _Graph, layer: nn.ConvTranspose, path: Path, x: str) -> str:
    """nn.ConvTranspose with transpose_kernel=True and integer padding (lo, hi) of the
    input-dilated convolution: PyTorch's padding is k - 1 - lo (3 -> 0 and 2 -> 1 at k=4)."""
    kernel_size = tuple(layer.kernel_size)
    padding = nn.linear.canonicalize_padding(layer.padding, len(kernel_size))
    if (not layer.transpose_kernel or isinstance(padding, str)
            or np.any(np.asarray(layer.kernel_dilation or 1) != 1)):
        raise UnknownLayerError(f"{_name(path)}: onnx_graph exports nn.ConvTranspose only with "
                                f"transpose_kernel=True, integer padding and no dilation")
    strides = [1, 1] if layer.strides is None else list(np.broadcast_to(layer.strides, 2))
    lows, highs = zip(*padding, strict=True)
    pads = [k - 1 - p for k, p in zip(kernel_size * 2, lows + highs, strict=True)]
    return _conv_transpose_nodes(graph, path, x, [int(s) for s in strides], pads)


def _upsample_conv(graph: _Graph, layer: strided_conv.UpsampleConv, path: Path, x: str) -> str:
    """PyTorch's ConvTranspose2d(k=4, s=2, p=1)."""
    return _conv_transpose_nodes(graph, path, x, strides=[2, 2], pads=[1, 1, 1, 1])


def _batch_norm(graph: _Graph, layer: nn.BatchNorm, path: Path, x: str) -> str:
    """BatchNorm on the running statistics; without scale or bias, with 1 and 0 for them."""
    mean = graph.variable("batch_stats", path, "mean")
    values = {
        "scale": graph.variable("params", path, "scale") if layer.use_scale else np.ones_like(mean),
        "bias": graph.variable("params", path, "bias") if layer.use_bias else np.zeros_like(mean),
        "mean": mean, "var": graph.variable("batch_stats", path, "var")}
    inputs = [graph.initializer(_name((*path, name)), value) for name, value in values.items()]
    return graph.node("BatchNormalization", [x, *inputs], path, epsilon=layer.epsilon)


def _class_batch_norm(graph: _Graph, layer: models.ClassBatchNorm, path: Path, x: str) -> str:
    """BatchNorm, then the gain and bias of each image's class, per channel."""
    x = graph.layer((*path, "BatchNorm_0"), x)
    for name, op in (("gain", "Mul"), ("bias", "Add")):
        rows = graph.layer((*path, name), graph.labels)
        x = graph.node(op, [x, graph.node("Reshape", [rows, graph.column], (*path, name))],
                       (*path, name))
    return x


def _embed(graph: _Graph, layer: nn.Embed, path: Path, labels: str) -> str:
    """The rows of the embedding for int labels [N]: [N, features]."""
    table = graph.initializer(_name((*path, "embedding")),
                              graph.variable("params", path, "embedding"))
    return graph.node("Gather", [table, labels], path, axis=0)


def _side_output(graph: _Graph, layer: nn.Conv, path: Path, x: str) -> None:
    """MSG's 1x1 to-image convolutions below the full resolution: not exported."""
    graph.skip(path)


Emitter = Callable[[_Graph, Any, Path, str], str | None]

# Every flax module type G calls -> the function that adds its ONNX nodes to the graph,
# called as (graph, module, its Flax path, the name of its input), returning its output's
# name. nn.ConvTranspose is the first layer and strided_conv.PortableUpsampleConv.
LAYERS: dict[type, Emitter] = {
    models.Generator: _generator,
    nn.ConvTranspose: _flax_conv_transpose,
    strided_conv.UpsampleConv: _upsample_conv,
    nn.BatchNorm: _batch_norm,
    models.ClassBatchNorm: _class_batch_norm,
    nn.Embed: _embed,
    nn.Conv: _side_output,
}


def generator_model(generator: models.Generator, variables: dict, nz: int,
                    opset: int = OPSET) -> onnx.ModelProto:
    """G in inference mode as a checked ONNX model: z [batch, nz] float32 (and, when G is
    class-conditional, label [batch] int32) -> images [batch, H, W, C] float32 in [-1, 1],
    the full-resolution images of `generator.apply(variables, z, label, train=False)`."""
    modules = _traced_modules(generator, nz)
    unknown = sorted({f"{type(module).__name__} (at {_name(path)})"
                      for path, module in modules.items() if type(module) not in LAYERS})
    if unknown:
        raise UnknownLayerError(f"onnx_graph.LAYERS has no emitter for {', '.join(unknown)}")
    inputs = [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", nz])]
    if generator.num_classes:
        inputs.append(helper.make_tensor_value_info("label", TensorProto.INT32, ["batch"]))
    graph = _Graph(modules, variables, "label" if generator.num_classes else None)
    images = graph.layer((), "z")
    graph.node("Transpose", [images], (), output="images", perm=[0, 2, 3, 1])
    graph.check_complete()
    size = generator.resolution
    output = helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                           ["batch", size, size, generator.channels])
    doc = ("dcgan_jax generator (dcgan_jax.models.Generator) in inference mode: z [batch, nz] "
           f"{'and label [batch] ' if generator.num_classes else ''}-> images [batch, H, W, C] "
           "in [-1, 1], NHWC")
    model = helper.make_model(
        helper.make_graph(graph.nodes, "dcgan_jax_generator", inputs, [output],
                          graph.initializers, doc_string=doc),
        producer_name="dcgan_jax", doc_string=doc,
        opset_imports=[helper.make_opsetid("", opset)])
    helper.set_model_props(model, {
        "model": "dcgan_jax.models.Generator", "nz": str(nz),
        **{field: str(getattr(generator, field)) for field in
           ("resolution", "channels", "base_channels", "msg", "num_classes", "cond")}})
    onnx.checker.check_model(model, full_check=True)
    return model
