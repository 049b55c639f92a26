"""Objectives and penalties against numpy formulas; second derivatives through D's own
strided convolutions against plain lax ones."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from dcgan_jax import losses, models, strided_conv

REAL = np.random.default_rng(0).normal(0.5, 1.5, 64)
FAKE = np.random.default_rng(1).normal(-0.5, 1.5, 64)


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


# D's and G's losses as the papers write them, in float64.
FORMULAS = {
    "ns": (lambda r, f, s: -((1 - s) * log_sigmoid(r) + s * log_sigmoid(-r)).mean()
           - log_sigmoid(-f).mean(),
           lambda f: -log_sigmoid(f).mean()),
    "hinge": (lambda r, f, s: np.maximum(0, 1 - r).mean() + np.maximum(0, 1 + f).mean(),
              lambda f: -f.mean()),
    "wgan": (lambda r, f, s: f.mean() - r.mean(), lambda f: -f.mean()),
    "lsgan": (lambda r, f, s: 0.5 * ((r - (1 - s)) ** 2).mean() + 0.5 * (f ** 2).mean(),
              lambda f: 0.5 * ((f - 1) ** 2).mean()),
}


def test_every_objective_has_its_formula():
    assert tuple(losses.OBJECTIVES) == tuple(FORMULAS)


@pytest.mark.parametrize("name", list(FORMULAS))
def test_each_loss_equals_its_formula(name):
    objective = losses.objective(name)
    d_formula, g_formula = FORMULAS[name]
    for smoothing in (0.0, 0.1) if objective.has_targets else (0.0,):
        d_loss = objective.d_loss(jnp.asarray(REAL, jnp.float32), jnp.asarray(FAKE, jnp.float32),
                                  smoothing)
        assert float(d_loss) == pytest.approx(d_formula(REAL, FAKE, smoothing), rel=1e-5)
    g_loss = objective.g_loss(jnp.asarray(FAKE, jnp.float32))
    assert float(g_loss) == pytest.approx(g_formula(FAKE), rel=1e-5)
    readout = np.asarray(objective.readout(jnp.asarray(REAL, jnp.float32)))
    expected = 1 / (1 + np.exp(-REAL)) if name == "ns" else REAL
    np.testing.assert_allclose(readout, expected, rtol=1e-5)
    assert objective.d_output == (losses.PROBABILITY if name == "ns" else losses.SCORE)


def cubic_critic(pyramid):
    """A critic whose input gradient is known: D(x) = sum x^3 / 3 over every scale, so
    grad D(x) = x^2. Its 'state' counts the passes, to check that it is threaded."""
    outputs = sum((x ** 3).reshape(x.shape[0], -1).sum(axis=1) / 3 for x in pyramid)
    return outputs, "after one pass"


def test_both_penalties_equal_their_formulas_over_a_whole_pyramid():
    rng = np.random.default_rng(2)
    real = tuple(rng.normal(size=(5, s, s, 3)).astype(np.float32) for s in (8, 4))
    fake = tuple(rng.normal(size=(5, s, s, 3)).astype(np.float32) for s in (8, 4))
    key = jax.random.PRNGKey(3)

    def squared_norms(pyramid):  # of grad D = x^2, both scales together
        return sum((np.asarray(x, np.float64) ** 4).reshape(5, -1).sum(1) for x in pyramid)

    value, state = losses.r1(cubic_critic, real, fake, key)
    assert state == "after one pass"
    assert float(value) == pytest.approx(0.5 * squared_norms(real).mean(), rel=1e-5)

    # One interpolation weight per image, the same at every scale.
    e = np.asarray(jax.random.uniform(key, (5, 1, 1, 1)), np.float64)
    between = [e * r + (1 - e) * f for r, f in zip(real, fake, strict=True)]
    value, state = losses.wgan_gp(cubic_critic, real, fake, key)
    assert state == "after one pass"
    expected = ((np.sqrt(squared_norms(between)) - 1) ** 2).mean()
    assert float(value) == pytest.approx(expected, rel=1e-5)


# The CPU's patch-matrix forms at every layer wide enough, one image per chunk (loops).
PATCH_FORMS = strided_conv.CpuForms(patches_min_channels=strided_conv.FEW_CHANNELS,
                                    conv_chunk_bytes=1, kernel_grad_chunk_bytes=1)


def plain_lax_conv(features, **kwargs):
    """A strided convolution as the backend's own, with autodiff's gradients: no patches or
    space-to-depth, no custom_vjp."""
    return nn.Conv(features, (4, 4), strides=2, padding=1, use_bias=False, **kwargs)


def force_accelerator_forms(monkeypatch):
    """What GPUs and TPUs run (the default branch of every platform_dependent), on a CPU."""
    monkeypatch.setattr(jax.lax, "platform_dependent",
                        lambda *args, cpu, default: default(*args))


@pytest.mark.parametrize("forms", ["patches", "accelerator", "host"])
def test_penalty_gradients_through_the_strided_convolutions_match_plain_lax(monkeypatch, forms):
    """Second derivatives: a penalty's gradient with respect to D's parameters, through the
    custom_vjp convolutions in each of their forms, equals that through lax's own."""
    rng = np.random.default_rng(4)
    real = models.image_pyramid(jnp.asarray(rng.uniform(-1, 1, (4, 32, 32, 1)), jnp.float32), 4)
    fake = models.image_pyramid(jnp.asarray(rng.uniform(-1, 1, (4, 32, 32, 1)), jnp.float32), 4)

    def penalty_gradient(downsample):
        d = models.Discriminator(resolution=32, base_channels=8, norm="spectral", msg=True,
                                 msg_combine="cat_lin", downsample=downsample)
        variables = d.init(jax.random.PRNGKey(0), real, train=False)

        def penalty(params):
            def critic(pyramid):
                return d.apply({"params": params, "batch_stats": variables["batch_stats"]},
                               pyramid, train=True, mutable=["batch_stats"])
            return (losses.wgan_gp(critic, real, fake, jax.random.PRNGKey(5))[0]
                    + losses.r1(critic, real, fake, None)[0])
        return jax.jit(jax.grad(penalty))(variables["params"])

    if forms == "accelerator":
        force_accelerator_forms(monkeypatch)
    ours = penalty_gradient(functools.partial(strided_conv.DownsampleConv, forms=PATCH_FORMS)
                            if forms == "patches" else strided_conv.DownsampleConv)
    plain = penalty_gradient(plain_lax_conv)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(ours),
                                 jax.tree.leaves(plain), strict=True):
        # Biases before a LeakyReLU do not move D's input gradient: theirs are zero.
        scale = float(jnp.abs(want).max())
        assert scale > 0 or path[-1].key == "bias", path
        assert float(jnp.abs(got - want).max()) <= 1e-4 * scale + 1e-9, path


@pytest.mark.parametrize("d_output,shown", [
    (losses.PROBABILITY, "D(x) 0.250 D(G(z)) 0.500/0.125"),
    (losses.SCORE, "score(x) 0.250 score(G(z)) 0.500/0.125"),
])
def test_logs_name_d_outputs_by_what_they_are(tmp_path, capsys, d_output, shown):
    """The progress line, metrics.jsonl and the plot say probabilities or raw scores."""
    import json

    from dcgan_jax import reporting, sample
    reporter = reporting.Reporter(str(tmp_path), total_steps=2, steps_per_epoch=2,
                                  num_epochs=1, images_per_step=8, learning_rates={},
                                  d_output=d_output)
    metrics = {"loss_d": 1.5, "loss_g": 0.5, "d_real": 0.25, "d_fake_before": 0.5,
               "d_fake_after": 0.125, "penalty": 0.75}
    reporter.write(2, {k: jnp.float32(v) for k, v in metrics.items()})
    reporter.writer.flush()
    assert f"loss_D 1.500 (penalty 0.750) loss_G 0.500 {shown} |" in capsys.readouterr().out
    (row,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert row["d_output"] == d_output and row["d_real"] == 0.25
    assert sample.write_plot(str(tmp_path), str(tmp_path / "losses.png")) == 1
