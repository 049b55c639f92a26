"""DiffAugment against numpy transcriptions of the authors' code, on MSG pyramids, and its
gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from dcgan_jax import augment
from dcgan_jax.models import image_pyramid

B, R, C = 6, 16, 3


def images(seed=0, size=R, channels=C):
    return np.random.default_rng(seed).uniform(-1, 1, (B, size, size, channels)).astype(
        np.float32)


def numpy_color(x, p):
    """rand_brightness, rand_saturation, rand_contrast of DiffAugment-pytorch, NHWC."""
    b, s, c = (np.asarray(p[k], np.float64)[:, None, None, None]
               for k in ("brightness", "saturation", "contrast"))
    x = x + b
    gray = x.mean(axis=3, keepdims=True)
    x = (x - gray) * s + gray
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return (x - mean) * c + mean


def numpy_translation(x, dy, dx):
    """rand_translation: zero-padded by one, indices clamped into the padding."""
    n, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.empty_like(x)
    for i in range(n):
        rows = np.clip(np.arange(h) + dy[i] + 1, 0, h + 1)
        cols = np.clip(np.arange(w) + dx[i] + 1, 0, w + 1)
        out[i] = padded[i][rows][:, cols]
    return out


def numpy_cutout(x, offset_y, offset_x, size):
    """rand_cutout: a size x size box from offset - size // 2, clamped into the image."""
    n, h, w, _ = x.shape
    mask = np.ones((n, h, w))
    for i in range(n):
        rows = np.clip(np.arange(size) + offset_y[i] - size // 2, 0, h - 1)
        cols = np.clip(np.arange(size) + offset_x[i] - size // 2, 0, w - 1)
        mask[i][np.ix_(rows, cols)] = 0
    return x * mask[..., None]


def draw(name, x, seed=1):
    params = augment.AUGMENTATIONS[name].draw(jax.random.PRNGKey(seed), jnp.asarray(x))
    return {k: np.asarray(v) for k, v in params.items()}


def apply(name, pyramid, params):
    return [np.asarray(y) for y in augment.AUGMENTATIONS[name].apply(
        tuple(jnp.asarray(x) for x in pyramid), {k: jnp.asarray(v) for k, v in params.items()})]


def test_color_equals_the_authors_formulas_and_draws_in_their_ranges():
    x = images()
    p = draw("color", x)
    assert np.all(np.abs(p["brightness"]) <= 0.5) and np.all((0 <= p["saturation"]) & (
        p["saturation"] <= 2)) and np.all((0.5 <= p["contrast"]) & (p["contrast"] <= 1.5))
    (got,) = apply("color", (x,), p)
    np.testing.assert_allclose(got, numpy_color(x.astype(np.float64), p), atol=1e-5)


def test_translation_equals_the_authors_shifts():
    x = images()
    p = draw("translation", x)
    assert augment.max_translation(x) == (2, 2)
    assert set(p["dy"]) | set(p["dx"]) <= {-2, -1, 0, 1, 2}
    (got,) = apply("translation", (x,), p)
    np.testing.assert_array_equal(got, numpy_translation(x, p["dy"], p["dx"]))


def test_cutout_equals_the_authors_box():
    x = images()
    p = draw("cutout", x)
    size = augment.cutout_size(x)[0]
    assert size == 8
    (got,) = apply("cutout", (x,), p)
    # The box's start is the authors' offset - size // 2.
    expected = numpy_cutout(x, p["top"] + size // 2, p["left"] + size // 2, size)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("name", list(augment.AUGMENTATIONS))
def test_every_scale_sees_the_same_augmentation(name):
    """With shifts and boxes on whole pixels of the coarsest scale, augmenting the pyramid
    of an image equals the pyramid of the augmented image, scale by scale."""
    x = images(size=32)
    params = draw(name, x)
    for k in ("dy", "dx", "top", "left"):  # multiples of 4: whole pixels at 8x8
        if k in params:
            params[k] = 4 * np.round(params[k] / 4).astype(np.int32)
    pyramid = image_pyramid(jnp.asarray(x), 3)
    got = apply(name, pyramid, params)
    expected = image_pyramid(jnp.asarray(apply(name, (x,), params)[0]), 3)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, np.asarray(e), atol=1e-5)


def test_translation_and_cutout_round_to_each_scales_pixels():
    x = images()
    pyramid = (x, x[:, ::2, ::2])
    params = {"dy": np.array([1, -1, 2, 0, 2, -2]), "dx": np.array([0, 2, -2, 1, -1, 1])}
    _, half = apply("translation", pyramid, params)
    np.testing.assert_array_equal(half, numpy_translation(
        pyramid[1], np.round(params["dy"] / 2).astype(int), np.round(params["dx"] / 2).astype(int)))
    # Rows 3..10 of 16 hold the centres 2j + 1 of rows 1..4 of 8; columns -5..2, of column 0.
    box = {"top": np.full(B, 3), "left": np.full(B, -5)}
    _, half = apply("cutout", pyramid, box)
    cut = np.all(half == 0, axis=-1)
    assert set(np.nonzero(cut[0].any(axis=1))[0]) == {1, 2, 3, 4}
    assert set(np.nonzero(cut[0].any(axis=0))[0]) == {0}
    assert cut.sum() == B * 4 * 1


def test_policy_is_keyed_and_differentiable():
    pyramid = tuple(jnp.asarray(y) for y in image_pyramid(jnp.asarray(images(size=8)), 2))
    policy = augment.parse_policy("color,translation,cutout")
    assert policy == ("color", "translation", "cutout") and augment.parse_policy("") == ()
    first = augment.diff_augment(pyramid, policy, jax.random.PRNGKey(0))
    again = augment.diff_augment(pyramid, policy, jax.random.PRNGKey(0))
    other = augment.diff_augment(pyramid, policy, jax.random.PRNGKey(1))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])
    check_grads(lambda *p: augment.diff_augment(p, policy, jax.random.PRNGKey(0)), pyramid,
                order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
