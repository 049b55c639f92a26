"""Shapes, parameter names, counts and output ranges of G and D at every resolution, and
every form of the strided convolutions."""

import functools
import hashlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from dcgan_jax import strided_conv
from dcgan_jax.models import (
    D_NORMS,
    MSG_COMBINES,
    Discriminator,
    Generator,
    image_pyramid,
    num_scales,
)

RESOLUTIONS = (32, 64, 128, 256)
VARIANTS = [(False, "simple")] + [(True, combine) for combine in MSG_COMBINES]


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def expected_generator_params(resolution, nz, ngf, channels, msg):
    """Counted layer by layer as in pytorch/examples' DCGAN, plus MSG's 1x1 to-image convs."""
    blocks = int(np.log2(resolution)) - 2
    widths = [ngf * 2 ** i for i in reversed(range(blocks))]  # 4x4 ... resolution/2
    total = nz * 16 * widths[0] + 2 * widths[0]
    for c_in, c_out in itertools.pairwise(widths):
        total += c_in * 16 * c_out + 2 * c_out
    total += widths[-1] * 16 * channels
    if msg:
        total += sum(w * channels + channels for w in widths)
    return total


def expected_discriminator_params(resolution, ndf, channels, msg, combine):
    blocks = int(np.log2(resolution)) - 2
    total, c_in = 0, channels
    for i in range(blocks):
        width = ndf * 2 ** i
        total += c_in * 16 * width + (2 * width if i > 0 else 0)
        c_in = width
        if msg:  # combined with the image of the next resolution
            if combine == "simple":
                c_in = width + channels
            elif combine == "lin_cat":
                total += channels * width + width
                c_in = 2 * width
            else:
                total += (width + channels) * width + width
    return total + c_in * 16


def abstract_variables(module, *args):
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, train=False))


def test_default_counts_equal_pytorch_examples_dcgan():
    g = abstract_variables(Generator(resolution=64), jnp.zeros((2, 100)))
    d = abstract_variables(Discriminator(resolution=64),
                           (jnp.zeros((2, 64, 64, 3)),))
    # netG and netD of pytorch/examples/dcgan at nz=100, ngf=ndf=64, nc=3.
    assert count(g["params"]) == 3_576_704
    assert count(d["params"]) == 2_765_568


@pytest.mark.parametrize("resolution", RESOLUTIONS)
@pytest.mark.parametrize("msg,combine", VARIANTS)
def test_shapes_and_parameter_counts(resolution, msg, combine):
    nz, ngf, ndf, channels, batch = 100, 64, 64, 3, 2
    generator = Generator(resolution=resolution, channels=channels, base_channels=ngf, msg=msg)
    discriminator = Discriminator(resolution=resolution, base_channels=ndf, msg=msg,
                                  msg_combine=combine)
    z = jnp.zeros((batch, nz))
    g_vars = abstract_variables(generator, z)
    outputs = jax.eval_shape(lambda v: generator.apply(v, z, train=False), g_vars)
    scales = num_scales(resolution, msg)
    assert [o.shape for o in outputs] == [
        (batch, resolution >> i, resolution >> i, channels) for i in range(scales)]
    assert outputs[-1].shape[1] == (4 if msg else resolution)

    pyramid = image_pyramid(jnp.zeros((batch, resolution, resolution, channels)), scales)
    d_vars = abstract_variables(discriminator, pyramid)
    logits = jax.eval_shape(lambda v: discriminator.apply(v, pyramid, train=False), d_vars)
    assert logits.shape == (batch,)

    assert count(g_vars["params"]) == expected_generator_params(
        resolution, nz, ngf, channels, msg)
    assert count(d_vars["params"]) == expected_discriminator_params(
        resolution, ndf, channels, msg, combine)


def structure(variables):
    """Every leaf of a variable tree as 'collection/module/.../name:shape'."""
    return [f"{jax.tree_util.keystr(path, simple=True, separator='/')}:"
            f"{'x'.join(map(str, leaf.shape))}"
            for path, leaf in jax.tree_util.tree_leaves_with_path(variables)]


def generator_structure(resolution, msg, **fields):
    generator = Generator(resolution=resolution, base_channels=4, msg=msg, **fields)
    return structure(abstract_variables(generator, jnp.zeros((2, 8))))


def discriminator_structure(resolution, msg, combine, norm, **fields):
    discriminator = Discriminator(resolution=resolution, base_channels=4, msg=msg,
                                  msg_combine=combine, norm=norm, **fields)
    pyramid = image_pyramid(jnp.zeros((2, resolution, resolution, 3)),
                            num_scales(resolution, msg))
    return structure(abstract_variables(discriminator, pyramid))


# Variable trees of the models before the strided convolutions left models.py: checkpoints
# of earlier runs load only while these stay as they are.
STRUCTURE_AT_32 = {
    ("G", False): (
        "batch_stats/BatchNorm_0/mean:16 batch_stats/BatchNorm_0/var:16 "
        "batch_stats/BatchNorm_1/mean:8 batch_stats/BatchNorm_1/var:8 "
        "batch_stats/BatchNorm_2/mean:4 batch_stats/BatchNorm_2/var:4 "
        "params/BatchNorm_0/bias:16 params/BatchNorm_0/scale:16 "
        "params/BatchNorm_1/bias:8 params/BatchNorm_1/scale:8 "
        "params/BatchNorm_2/bias:4 params/BatchNorm_2/scale:4 "
        "params/ConvTranspose_0/kernel:4x4x16x8 params/ConvTranspose_1/kernel:4x4x8x16 "
        "params/ConvTranspose_2/kernel:4x4x4x8 params/ConvTranspose_3/kernel:4x4x3x4"),
    ("G", True): (
        "batch_stats/BatchNorm_0/mean:16 batch_stats/BatchNorm_0/var:16 "
        "batch_stats/BatchNorm_1/mean:8 batch_stats/BatchNorm_1/var:8 "
        "batch_stats/BatchNorm_2/mean:4 batch_stats/BatchNorm_2/var:4 "
        "params/BatchNorm_0/bias:16 params/BatchNorm_0/scale:16 "
        "params/BatchNorm_1/bias:8 params/BatchNorm_1/scale:8 "
        "params/BatchNorm_2/bias:4 params/BatchNorm_2/scale:4 "
        "params/ConvTranspose_0/kernel:4x4x16x8 params/ConvTranspose_1/kernel:4x4x8x16 "
        "params/ConvTranspose_2/kernel:4x4x4x8 params/ConvTranspose_3/kernel:4x4x3x4 "
        "params/Conv_0/bias:3 params/Conv_0/kernel:1x1x16x3 "
        "params/Conv_1/bias:3 params/Conv_1/kernel:1x1x8x3 "
        "params/Conv_2/bias:3 params/Conv_2/kernel:1x1x4x3"),
    ("D", False, "simple", "batch"): (
        "batch_stats/BatchNorm_0/mean:8 batch_stats/BatchNorm_0/var:8 "
        "batch_stats/BatchNorm_1/mean:16 batch_stats/BatchNorm_1/var:16 "
        "params/BatchNorm_0/bias:8 params/BatchNorm_0/scale:8 "
        "params/BatchNorm_1/bias:16 params/BatchNorm_1/scale:16 "
        "params/Conv_0/kernel:4x4x3x4 params/Conv_1/kernel:4x4x4x8 "
        "params/Conv_2/kernel:4x4x8x16 params/Conv_3/kernel:4x4x16x1"),
    ("D", True, "lin_cat", "spectral"): (
        "batch_stats/SpectralNorm_0/Conv_0/kernel/sigma: "
        "batch_stats/SpectralNorm_0/Conv_0/kernel/u:1x4 "
        "batch_stats/SpectralNorm_1/Conv_1/kernel/sigma: "
        "batch_stats/SpectralNorm_1/Conv_1/kernel/u:1x4 "
        "batch_stats/SpectralNorm_2/Conv_2/kernel/sigma: "
        "batch_stats/SpectralNorm_2/Conv_2/kernel/u:1x8 "
        "batch_stats/SpectralNorm_3/Conv_3/kernel/sigma: "
        "batch_stats/SpectralNorm_3/Conv_3/kernel/u:1x8 "
        "batch_stats/SpectralNorm_4/Conv_4/kernel/sigma: "
        "batch_stats/SpectralNorm_4/Conv_4/kernel/u:1x16 "
        "batch_stats/SpectralNorm_5/Conv_5/kernel/sigma: "
        "batch_stats/SpectralNorm_5/Conv_5/kernel/u:1x16 "
        "batch_stats/SpectralNorm_6/Conv_6/kernel/sigma: "
        "batch_stats/SpectralNorm_6/Conv_6/kernel/u:1x1 "
        "params/Conv_0/kernel:4x4x3x4 params/Conv_1/bias:4 params/Conv_1/kernel:1x1x3x4 "
        "params/Conv_2/kernel:4x4x8x8 params/Conv_3/bias:8 params/Conv_3/kernel:1x1x3x8 "
        "params/Conv_4/kernel:4x4x16x16 params/Conv_5/bias:16 params/Conv_5/kernel:1x1x3x16 "
        "params/Conv_6/kernel:4x4x32x1"),
}

# sha256 of every variable tree below (1,176 leaves), as the pre-split models made them.
STRUCTURE_DIGEST = "adba72a1b1da7caf9d1555e5fd857bbf4f11de0fd74c5a3e8f1c216785e1382d"


def all_structures():
    """{name: structure} for G and D at every resolution, with and without MSG, every MSG
    combination and every d_norm (base width 4, 3 channels, nz 8)."""
    structures = {}
    for resolution in RESOLUTIONS:
        for msg in (False, True):
            structures[f"G {resolution} msg={msg}"] = generator_structure(resolution, msg)
            for combine in MSG_COMBINES if msg else ("simple",):
                for norm in D_NORMS:
                    structures[f"D {resolution} msg={msg} {combine} {norm}"] = (
                        discriminator_structure(resolution, msg, combine, norm))
    return structures


def test_variable_names_and_shapes_are_those_of_earlier_checkpoints():
    for key, expected in STRUCTURE_AT_32.items():
        got = (generator_structure(32, key[1]) if key[0] == "G"
               else discriminator_structure(32, *key[1:]))
        assert got == expected.split(" "), key
    structures = all_structures()
    lines = [f"{name}|{leaf.replace(':', '|')}"
             for name in sorted(structures) for leaf in structures[name]]
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == STRUCTURE_DIGEST


# nn.Conv and nn.ConvTranspose as the networks' strided layers: the same kernels, autodiff's
# gradients.
PLAIN_DOWNSAMPLE = functools.partial(nn.Conv, kernel_size=(4, 4), strides=(2, 2), padding=1,
                                     use_bias=False)
PLAIN_UPSAMPLE = functools.partial(nn.ConvTranspose, kernel_size=(4, 4), strides=(2, 2),
                                   padding=2, use_bias=False, transpose_kernel=True)


@pytest.mark.parametrize("norm", D_NORMS)
@pytest.mark.parametrize("msg", [False, True])
def test_strided_layers_are_fields_that_flax_layers_can_fill(msg, norm):
    """G and D built with nn.ConvTranspose / nn.Conv through their `upsample` / `downsample`
    fields have the same variables, and compute what the default layers compute."""
    assert generator_structure(64, msg, upsample=PLAIN_UPSAMPLE) == generator_structure(64, msg)
    assert (discriminator_structure(64, msg, "cat_lin", norm, downsample=PLAIN_DOWNSAMPLE)
            == discriminator_structure(64, msg, "cat_lin", norm))

    z = jax.random.normal(jax.random.PRNGKey(1), (4, 16))
    default_g = Generator(resolution=32, channels=1, base_channels=8, msg=msg)
    plain_g = default_g.clone(upsample=PLAIN_UPSAMPLE)
    g_vars = default_g.init(jax.random.PRNGKey(0), z, train=False)
    jax.tree.map(np.testing.assert_array_equal, g_vars,
                 plain_g.init(jax.random.PRNGKey(0), z, train=False))
    images = default_g.apply(g_vars, z, train=False)
    for ours, theirs in zip(images, plain_g.apply(g_vars, z, train=False), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)

    default_d = Discriminator(resolution=32, base_channels=8, msg=msg, msg_combine="cat_lin",
                              norm=norm)
    plain_d = default_d.clone(downsample=PLAIN_DOWNSAMPLE)
    d_vars = default_d.init(jax.random.PRNGKey(0), images, train=False)
    jax.tree.map(np.testing.assert_array_equal, d_vars,
                 plain_d.init(jax.random.PRNGKey(0), images, train=False))
    critic = lambda d: lambda v, x: d.apply(v, x, train=False)  # noqa: E731
    np.testing.assert_allclose(critic(default_d)(d_vars, images),
                               critic(plain_d)(d_vars, images), rtol=1e-5, atol=1e-5)
    ours = jax.grad(lambda v: critic(default_d)(v, images).sum())(d_vars)
    theirs = jax.grad(lambda v: critic(plain_d)(v, images).sum())(d_vars)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        assert np.abs(a - b).max() <= 1e-5 * max(np.abs(b).max(), 1e-6)


@pytest.mark.parametrize("msg,combine", VARIANTS)
def test_forward_ranges(msg, combine):
    generator = Generator(resolution=32, channels=1, base_channels=8, msg=msg)
    discriminator = Discriminator(resolution=32, base_channels=8, msg=msg, msg_combine=combine)
    z = 3.0 * jax.random.normal(jax.random.PRNGKey(1), (6, 16))
    g_vars = generator.init(jax.random.PRNGKey(0), z, train=False)
    fakes, _ = generator.apply(g_vars, z, train=True, mutable=["batch_stats"])
    for image in fakes:
        assert float(jnp.min(image)) >= -1.0 and float(jnp.max(image)) <= 1.0
        assert float(jnp.std(image)) > 0.0
    d_vars = discriminator.init(jax.random.PRNGKey(0), fakes, train=False)
    logits, _ = discriminator.apply(d_vars, fakes, train=True, mutable=["batch_stats"])
    assert logits.shape == (6,) and bool(jnp.all(jnp.isfinite(logits)))
    assert len(set(np.asarray(logits).round(6))) == 6  # one logit per image


def test_initialisation_statistics():
    g_vars = Generator(resolution=64).init(jax.random.PRNGKey(0), jnp.zeros((2, 100)),
                                           train=False)
    kernel = g_vars["params"]["ConvTranspose_1"]["kernel"]
    scale = g_vars["params"]["BatchNorm_1"]["scale"]
    assert abs(float(kernel.mean())) < 1e-3 and abs(float(kernel.std()) - 0.02) < 1e-3
    assert abs(float(scale.mean()) - 1.0) < 5e-3 and abs(float(scale.std()) - 0.02) < 5e-3
    assert float(jnp.abs(g_vars["params"]["BatchNorm_1"]["bias"]).max()) == 0.0


def test_real_pyramid_is_average_pooled():
    images = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3), minval=-1, maxval=1)
    pyramid = image_pyramid(images, num_scales(32, True))
    assert [p.shape[1] for p in pyramid] == [32, 16, 8, 4]
    expected = np.asarray(images).reshape(2, 4, 8, 4, 8, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(pyramid[3], expected, rtol=1e-5, atol=1e-6)


def test_discriminator_rejects_wrong_pyramid():
    discriminator = Discriminator(resolution=32, base_channels=8, msg=True)
    with pytest.raises(ValueError, match="pyramid of 4 images"):
        discriminator.init(jax.random.PRNGKey(0), (jnp.zeros((1, 32, 32, 3)),), train=False)


@pytest.mark.parametrize("side,c_in,c_out", [(4, 16, 8), (8, 6, 3), (8, 5, 1)])
def test_upsample_conv_equals_pytorch_conv_transpose_and_autodiff(side, c_in, c_out):
    """The custom-gradient upsampling equals torch's ConvTranspose2d(4, 2, 1) forward, and
    flax's nn.ConvTranspose with autodiff gradients, to float32 rounding."""
    torch = pytest.importorskip("torch")
    from dcgan_jax.strided_conv import upsample_conv
    kx, kk = jax.random.split(jax.random.PRNGKey(side))
    x = jax.random.normal(kx, (3, side, side, c_in))
    kernel = jax.random.normal(kk, (4, 4, c_out, c_in))
    reference = lambda x, k: jax.lax.conv_transpose(  # noqa: E731  (flax's formulation)
        x, k, (2, 2), ((2, 2), (2, 2)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        transpose_kernel=True)
    y = upsample_conv(x, kernel)
    assert y.shape == (3, 2 * side, 2 * side, c_out)
    expected = torch.nn.functional.conv_transpose2d(
        torch.tensor(np.asarray(x)).permute(0, 3, 1, 2),
        torch.tensor(np.asarray(kernel)).permute(3, 2, 0, 1), stride=2, padding=1)
    np.testing.assert_allclose(y, expected.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-4)

    loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)) * jnp.arange(c_out))  # noqa: E731
    ours = jax.grad(loss(upsample_conv), argnums=(0, 1))(x, kernel)
    theirs = jax.grad(loss(reference), argnums=(0, 1))(x, kernel)
    for a, b in zip(ours, theirs, strict=True):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


@pytest.mark.parametrize("avx512", [False, True])
@pytest.mark.parametrize("chunk_bytes", [None, 1])
@pytest.mark.parametrize("channels,side", [(1, 8), (3, 16), (128, 8), (16, 16), (16, 64)])
def test_downsample_conv_equals_autodiff(channels, side, chunk_bytes, avx512):
    """The forms a CPU takes (space-to-depth for few channels, patches times kernel for
    many, else direct), the input gradient (their adjoints) and the kernel gradient
    (patches times gradient, in the orientation an AVX2 or an AVX-512 host picks), in batch
    chunks (one image per chunk with chunk_bytes=1) or not, equal the direct convolution
    and its autodiff."""
    chunks = {"conv_chunk_bytes": chunk_bytes, "kernel_grad_chunk_bytes": chunk_bytes}
    forms = strided_conv.CpuForms(kernel_grad_wide_minor=avx512,
                                  **(chunks if chunk_bytes else {}))
    downsample_conv = lambda x, k: strided_conv.downsample_conv(x, k, forms)  # noqa: E731
    x = jax.random.normal(jax.random.PRNGKey(0), (4, side, side, channels))
    # Scaled so that outputs are of order one, where sin() does not magnify rounding.
    kernel = jax.random.normal(jax.random.PRNGKey(1), (4, 4, channels, 8)) / np.sqrt(16 * channels)
    reference = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y, expected = downsample_conv(x, kernel), reference(x, kernel)
    assert np.abs(y - expected).max() <= 1e-5 * np.abs(expected).max()
    loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)) * jnp.arange(8))  # noqa: E731
    ours = jax.grad(loss(downsample_conv), argnums=(0, 1))(x, kernel)
    theirs = jax.grad(loss(reference), argnums=(0, 1))(x, kernel)
    for a, b in zip(ours, theirs, strict=True):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


@pytest.mark.parametrize("c_in,c_out,side", [(1, 8, 8), (3, 16, 16), (9, 4, 8), (16, 8, 16)])
def test_every_form_of_the_strided_convolution_agrees(c_in, c_out, side):
    """Each form of the convolution, its adjoint and its kernel gradient, including those
    only GPUs and TPUs take (input-dilated transposition, convolution kernel gradient) and
    the patch products in chunks of one image, equals the direct convolution, its
    transposition and its autodiff."""
    kx, kk, kg = jax.random.split(jax.random.PRNGKey(c_in), 3)
    x = jax.random.normal(kx, (4, side, side, c_in))
    kernel = jax.random.normal(kk, (4, 4, c_in, c_out))
    grad_y = jax.random.normal(kg, (4, side // 2, side // 2, c_out))
    direct = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def close(a, b):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()

    close(strided_conv.space_to_depth_conv(x, kernel), direct(x, kernel))
    close(strided_conv.conv_by_patches(x, kernel), direct(x, kernel))
    adjoint = jax.linear_transpose(lambda u: direct(u, kernel), x)(grad_y)[0]
    close(strided_conv.conv_transpose_by_space_to_depth(grad_y, kernel), adjoint)
    close(strided_conv.conv_transpose_by_patches(grad_y, kernel), adjoint)
    close(strided_conv.conv_transpose_input_dilated(grad_y, kernel), adjoint)
    kernel_grad = jax.vjp(lambda k: direct(x, k), kernel)[1](grad_y)[0]
    close(strided_conv.kernel_grad_by_convolution(x, grad_y, kernel), kernel_grad)
    for wide_minor in (False, True):
        close(strided_conv.kernel_grad_by_matmuls(x, grad_y, kernel, wide_minor), kernel_grad)
    one_image_chunks = strided_conv.CpuForms(conv_chunk_bytes=1)
    close(strided_conv.conv_by_patches(x, kernel, one_image_chunks), direct(x, kernel))


def test_patches_adjoint_is_the_transpose_of_patches():
    """The four-shift scatter matches `jax.linear_transpose` of the patch gather, on a
    non-square image."""
    image = jax.ShapeDtypeStruct((2, 8, 12, 5), jnp.float32)
    rows = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 6, 16 * 5))
    expected = jax.linear_transpose(lambda v: strided_conv._patches(v, 4, 6), image)(rows)[0]
    ours = strided_conv._patches_adjoint(rows, 5)
    assert ours.shape == image.shape
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("form", ["conv_by_patches", "conv_transpose_by_patches",
                                  "conv_transpose_by_space_to_depth"])
def test_patch_forms_in_bfloat16_round_like_the_direct_form(form):
    """In bfloat16 the patch products accumulate, and scatter, in float32: their error
    against float32 is that of the direct (or input-dilated) bfloat16 form, not larger."""
    transposed = "transpose" in form
    kx, kk = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (4, 4, 4, 64) if transposed else (4, 8, 8, 64))
    kernel = jax.random.normal(kk, (4, 4, 64, 64)) / 32.0
    reference = (strided_conv.conv_transpose_input_dilated if transposed
                 else strided_conv.direct_conv)
    exact = reference(x, kernel)
    ours = getattr(strided_conv, form)(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
    theirs = reference(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
    assert ours.dtype == jnp.bfloat16
    error = lambda y: float(np.abs(np.asarray(y, np.float32) - exact).max())  # noqa: E731
    assert error(ours) <= 1.5 * error(theirs)


@pytest.mark.parametrize("wide_minor", [False, True])
def test_kernel_gradient_in_bfloat16_rounds_like_the_convolution_form(wide_minor):
    """In bfloat16 the kernel gradient's products accumulate in float32 in either
    orientation: its error against float32 is that of autodiff's bfloat16 convolution."""
    kx, kg, kk = jax.random.split(jax.random.PRNGKey(1), 3)
    x = jax.random.normal(kx, (4, 8, 8, 32))
    grad_y = jax.random.normal(kg, (4, 4, 4, 16))
    kernel = jax.random.normal(kk, (4, 4, 32, 16))
    exact = strided_conv.kernel_grad_by_convolution(x, grad_y, kernel)
    low = [a.astype(jnp.bfloat16) for a in (x, grad_y, kernel)]
    ours = strided_conv.kernel_grad_by_matmuls(*low, wide_minor=wide_minor)
    theirs = strided_conv.kernel_grad_by_convolution(*low)
    assert ours.dtype == jnp.bfloat16 and ours.shape == kernel.shape
    error = lambda y: float(np.abs(np.asarray(y, np.float32) - exact).max())  # noqa: E731
    assert error(ours) <= 1.5 * error(theirs)


def test_strided_convolution_rejects_odd_sizes():
    from dcgan_jax.strided_conv import downsample_conv
    with pytest.raises(ValueError, match="even height and width, got 9x8"):
        downsample_conv(jnp.zeros((1, 9, 8, 16)), jnp.zeros((4, 4, 16, 4)))


def test_leaky_slope_is_the_discriminators_negative_slope():
    images = (jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 1)),)
    default = Discriminator(resolution=32, base_channels=4)
    variables = default.init(jax.random.PRNGKey(1), images, train=False)
    steep = Discriminator(resolution=32, base_channels=4, leaky_slope=0.5)
    relu = Discriminator(resolution=32, base_channels=4, leaky_slope=0.0)
    outputs = [d.apply(variables, images, train=False) for d in (default, steep, relu)]
    assert default.leaky_slope == 0.2
    assert not np.allclose(outputs[0], outputs[1]) and not np.allclose(outputs[0], outputs[2])
