"""GAN objectives and D's gradient penalties, picked by name.

An objective turns D's raw outputs on real and fake images into D's and G's losses, and
says what those outputs mean: probabilities after a sigmoid (`ns`) or raw scores (the
others), so that logs show them as the objective reads them. Penalties constrain D's
gradient with respect to its input; they are added to D's loss, times config.train.gp_weight.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from dcgan_jax.models import Pyramid

PROBABILITY = "probability"
SCORE = "score"
# How logs name D's output on real images x and fakes G(z), by what the output is.
D_OUTPUT_NAMES = {PROBABILITY: "D", SCORE: "score"}


@dataclasses.dataclass(frozen=True)
class Objective:
    """D's loss from its outputs on reals and fakes (and the one-sided label smoothing, for
    objectives with targets), G's loss from D's outputs on fakes, and what D outputs."""

    d_loss: Callable[[jax.Array, jax.Array, float], jax.Array]
    g_loss: Callable[[jax.Array], jax.Array]
    d_output: str
    has_targets: bool

    def readout(self, outputs: jax.Array) -> jax.Array:
        """D's outputs as logs show them: probabilities or the raw scores."""
        return jax.nn.sigmoid(outputs) if self.d_output == PROBABILITY else outputs


def bce(logits: jax.Array, target: float) -> jax.Array:
    """Mean binary cross-entropy of logits against a constant target."""
    return optax.sigmoid_binary_cross_entropy(logits, jnp.full_like(logits, target)).mean()


def _ns_d_loss(real: jax.Array, fake: jax.Array, label_smoothing: float) -> jax.Array:
    return bce(real, 1.0 - label_smoothing) + bce(fake, 0.0)


def _ns_g_loss(fake: jax.Array) -> jax.Array:
    """Non-saturating: G maximises log D(G(z)) rather than minimising log(1 - D(G(z)))."""
    return bce(fake, 1.0)


def _hinge_d_loss(real: jax.Array, fake: jax.Array, label_smoothing: float) -> jax.Array:
    del label_smoothing  # no targets; config.validate refuses it
    return jax.nn.relu(1.0 - real).mean() + jax.nn.relu(1.0 + fake).mean()


def _critic_g_loss(fake: jax.Array) -> jax.Array:
    """G raises the critic's score of its fakes (hinge and WGAN alike)."""
    return -fake.mean()


def _wgan_d_loss(real: jax.Array, fake: jax.Array, label_smoothing: float) -> jax.Array:
    del label_smoothing  # no targets; config.validate refuses it
    return fake.mean() - real.mean()


def _lsgan_d_loss(real: jax.Array, fake: jax.Array, label_smoothing: float) -> jax.Array:
    """Mao et al. 2017 with targets 0 (fake) and 1 - label_smoothing (real)."""
    return 0.5 * jnp.square(real - (1.0 - label_smoothing)).mean() + 0.5 * jnp.square(fake).mean()


def _lsgan_g_loss(fake: jax.Array) -> jax.Array:
    return 0.5 * jnp.square(fake - 1.0).mean()


OBJECTIVES: dict[str, Objective] = {
    "ns": Objective(_ns_d_loss, _ns_g_loss, PROBABILITY, has_targets=True),
    "hinge": Objective(_hinge_d_loss, _critic_g_loss, SCORE, has_targets=False),
    "wgan": Objective(_wgan_d_loss, _critic_g_loss, SCORE, has_targets=False),
    "lsgan": Objective(_lsgan_d_loss, _lsgan_g_loss, SCORE, has_targets=True),
}


def objective(name: str) -> Objective:
    """The objective config.train.loss names."""
    if name not in OBJECTIVES:
        raise ValueError(f"loss {name!r} is not one of {tuple(OBJECTIVES)}")
    return OBJECTIVES[name]


# D on a pyramid: its outputs, and its state after the pass (batch_stats).
Critic = Callable[[Pyramid], tuple[jax.Array, Any]]
Penalty = Callable[[Critic, Pyramid, Pyramid, jax.Array], tuple[jax.Array, Any]]


def _input_gradient_squared_norms(critic: Critic, pyramid: Pyramid) -> tuple[jax.Array, Any]:
    """Per-image squared norms of D's output gradient with respect to its whole input (every
    scale of an MSG pyramid together), and D's state after the pass."""
    outputs, pullback, state = jax.vjp(critic, pyramid, has_aux=True)
    (grads,) = pullback(jnp.ones_like(outputs))
    squares = sum(jnp.square(g).reshape(g.shape[0], -1).sum(axis=1) for g in grads)
    return squares, state


def wgan_gp(critic: Critic, real: Pyramid, fake: Pyramid,
            key: jax.Array) -> tuple[jax.Array, Any]:
    """Gulrajani et al. 2017: mean (||grad D(x_hat)|| - 1)^2 at x_hat = e x + (1 - e) G(z),
    one uniform e per image, shared by the scales of a pyramid."""
    e = jax.random.uniform(key, (real[0].shape[0], 1, 1, 1))
    between = tuple(e * r + (1.0 - e) * f for r, f in zip(real, fake, strict=True))
    squares, state = _input_gradient_squared_norms(critic, between)
    # The epsilon keeps the gradient finite where D would be flat.
    return jnp.square(jnp.sqrt(squares + 1e-12) - 1.0).mean(), state


def r1(critic: Critic, real: Pyramid, fake: Pyramid,
       key: jax.Array) -> tuple[jax.Array, Any]:
    """Mescheder et al. 2018: 1/2 mean ||grad D(x)||^2 on reals; times gp_weight = gamma
    this is their (gamma / 2) E ||grad D(x)||^2."""
    del fake, key
    squares, state = _input_gradient_squared_norms(critic, real)
    return 0.5 * squares.mean(), state


# config.train.gradient_penalty's values but 'none' (names.GRADIENT_PENALTIES).
GRADIENT_PENALTIES: dict[str, Penalty] = {"wgan_gp": wgan_gp, "r1": r1}
