"""The GAN state and the one jitted step that updates D `d_steps` times and G once.

A batch is a dict, as in flax's imagenet example: `image` [d_steps, N, H, W, C], and `label`
[d_steps, N] int32 where the data has labels. A conditional model (config.model.num_classes
above 0) reads the labels of the reals, and draws its fakes' labels uniformly over the
classes from (rng, step), as it draws their latents.

The objective, D's gradient penalty and the augmentation of D's inputs are picked by name
(config.train.loss, gradient_penalty, augment) from `losses` and `augment`.

Only jax, flax and optax are imported here, so the models and the step run on machines
without the input or logging stack. `config` is any object with the fields of
`dcgan_jax.config.get_default_config()`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state
from jax.sharding import Mesh

from dcgan_jax import augment, losses, models, parallel
from dcgan_jax.models import Pyramid, image_pyramid, num_scales
from dcgan_jax.strided_conv import (
    DownsampleConv,
    PortableDownsampleConv,
    PortableUpsampleConv,
    UpsampleConv,
)

Metrics = dict[str, jax.Array]
Batch = dict[str, jax.Array]


class TrainState(train_state.TrainState):
    """A network's parameters, optimizer and `batch_stats` (BatchNorm statistics, or the
    power-iteration state of spectral normalisation).

    Its apply_fn is None: wherever the networks run they are built from the config
    (`build_models`), so a state holds only arrays and checkpoints only those.
    """

    batch_stats: Any = None


@struct.dataclass
class GANState:
    """Both networks, G's moving average (None when disabled), the base key and the step."""

    g: TrainState
    d: TrainState
    ema: Any
    rng: jax.Array
    step: jax.Array


def build_models(config: Any, conv_forms: Any = None, *, dtype: Any = None,
                 portable: bool = False) -> tuple[Any, Any]:
    """G and D of config.model.family (models.FAMILIES), computing in `dtype` (None:
    config.dtype), their strided convolutions in `conv_forms` (strided_conv's CPU forms;
    None: this host's), or in flax's plain layers when `portable` (for exports: the same
    parameters and images, and no host-tuned forms inside)."""
    upsample, downsample = UpsampleConv, DownsampleConv
    if portable:
        upsample, downsample = PortableUpsampleConv, PortableDownsampleConv
    elif conv_forms is not None:
        upsample = functools.partial(UpsampleConv, forms=conv_forms)
        downsample = functools.partial(DownsampleConv, forms=conv_forms)
    dtype = jnp.dtype(config.dtype if dtype is None else dtype)
    return models.FAMILIES[config.model.family](config.model, dtype, upsample=upsample,
                                                downsample=downsample)


def class_labels(config: Any, batch: int) -> jax.Array | None:
    """Placeholder labels for shapes and initialisation (None for unconditional models)."""
    return jnp.zeros((batch,), jnp.int32) if config.model.num_classes else None


def learning_rate_fns(config: Any, total_steps: int) -> dict[str, optax.Schedule]:
    """Learning rate of G and D by train step (D's optimizer counts d_steps per step)."""
    t = config.train

    def schedule(base_lr: float) -> optax.Schedule:
        if t.lr_decay:
            return optax.linear_schedule(base_lr, 0.0, max(total_steps, 1))
        return optax.constant_schedule(base_lr)

    return {"lr_g": schedule(t.lr_g), "lr_d": schedule(t.lr_d)}


def _optimizers(config: Any, total_steps: int) -> tuple[optax.GradientTransformation, ...]:
    rates = learning_rate_fns(config, total_steps)
    d_steps = config.train.d_steps
    adam = functools.partial(optax.adam, b1=config.train.beta1, b2=config.train.beta2)
    return adam(rates["lr_g"]), adam(lambda count: rates["lr_d"](count // d_steps))


def _init_state(rng: jax.Array, config: Any, total_steps: int) -> GANState:
    generator, discriminator = build_models(config)
    g_key, d_key, state_key = jax.random.split(rng, 3)
    m = config.model
    z = jnp.zeros((2, m.nz), jnp.float32)
    labels = class_labels(config, 2)
    g_vars = generator.init(g_key, z, labels, train=False)
    pyramid = image_pyramid(jnp.zeros((2, m.resolution, m.resolution, m.channels)),
                            num_scales(m.resolution, m.msg))
    d_vars = discriminator.init(d_key, pyramid, labels, train=False)
    g_tx, d_tx = _optimizers(config, total_steps)
    g = TrainState.create(apply_fn=None, params=g_vars["params"],
                          batch_stats=g_vars["batch_stats"], tx=g_tx)
    # A D without BatchNorm or spectral normalisation has no batch_stats.
    d = TrainState.create(apply_fn=None, params=d_vars["params"],
                          batch_stats=d_vars.get("batch_stats", {}), tx=d_tx)
    ema = ({"params": g.params, "batch_stats": g.batch_stats}
           if config.train.ema_decay > 0 else None)
    return GANState(g=g, d=d, ema=ema, rng=state_key, step=jnp.zeros((), jnp.int32))


def create_train_state(config: Any, mesh: Mesh, total_steps: int) -> GANState:
    """Initialises both networks directly into replicated device memory."""
    rng = jax.random.PRNGKey(config.seed)
    init = functools.partial(_init_state, config=config, total_steps=total_steps)
    return jax.jit(init, out_shardings=parallel.replicated(mesh))(rng)


def abstract_train_state(config: Any, mesh: Mesh, total_steps: int) -> GANState:
    """Shapes, dtypes and shardings of the state, without allocating it (for restores)."""
    init = functools.partial(_init_state, config=config, total_steps=total_steps)
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
    sharding = parallel.replicated(mesh)
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def ema_decay_at(decay: float, step: jax.Array) -> jax.Array:
    """EMA decay ramped up as (1 + step) / (10 + step), so that the average is not
    dominated by the initial weights early in training."""
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def latent_batch(rng: jax.Array, step: jax.Array, index: int, batch: int,
                 nz: int) -> jax.Array:
    """The latents of D update `index` in `step`: a pure function of (rng, step, index)."""
    key = jax.random.fold_in(jax.random.fold_in(rng, step), index)
    return jax.random.normal(key, (batch, nz), jnp.float32)


def latent_sequence(seed: int | jax.Array, indices: jax.Array, nz: int) -> jax.Array:
    """Latents of `indices` in the sequence `seed` names: latent i is the same whatever
    batch it is drawn in, so sampling and evaluation can agree image for image."""
    key = jax.random.PRNGKey(seed)
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (nz,)))(indices)


# Key streams of a step beyond the D updates' indices in `latent_batch`: flips, the
# augmentations of D's inputs, the interpolates of gradient penalties, and fakes' classes.
FLIP_STREAM = 2**31 - 1
AUGMENT_STREAM = 2**31 - 2
PENALTY_STREAM = 2**31 - 3
LABEL_STREAM = 2**31 - 4


def stream_key(rng: jax.Array, step: jax.Array, stream: int, index: int) -> jax.Array:
    """The key of draw `index` of `stream` in `step`: a pure function of (rng, step), so
    any device count, and a resumed run, draw alike."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(rng, step), stream), index)


def label_batch(rng: jax.Array, step: jax.Array, index: int, batch: int,
                num_classes: int) -> jax.Array:
    """The classes of the fakes of D update `index` in `step`, uniform over the classes: a
    pure function of (rng, step, index), as their latents are."""
    return jax.random.randint(stream_key(rng, step, LABEL_STREAM, index), (batch,), 0,
                              num_classes, jnp.int32)


def random_flips(images: jax.Array, rng: jax.Array, step: jax.Array) -> jax.Array:
    """Each image [..., H, W, C] mirrored left-right with probability 1/2, a pure function of
    (rng, step, index): runs on any device count, and resumed runs, flip alike."""
    key = jax.random.fold_in(jax.random.fold_in(rng, step), FLIP_STREAM)
    flip = jax.random.bernoulli(key, 0.5, images.shape[:-3])
    return jnp.where(flip[..., None, None, None], jnp.flip(images, axis=-2), images)


def train_step(state: GANState, batch: Batch, config: Any, latent_sharding: Any = None,
               conv_forms: Any = None) -> tuple[GANState, Metrics]:
    """`d_steps` D updates on batch["image"][i] and fresh fakes, then one G update.

    The images are [d_steps, batch, H, W, C], uint8 or in [-1, 1], flipped here when
    config.data.random_flip; a conditional model also reads batch["label"], and D sees
    reals with their classes and fakes with the classes G drew them for. Gradient
    penalties take D at the reals' classes (WGAN-GP's interpolates too). G's update reuses
    the fake batch of
    the last D update (as pytorch/examples does): its forward pass is kept as a VJP, so
    G runs once per D update and no forward pass is recomputed. With augmentation, reals
    and fakes each draw their own parameters in every D update, and G's update draws anew.

    Metrics: the losses (D's includes its penalty, also logged alone as `penalty`) and D's
    mean outputs on reals, and on fakes before and after D's update(s), as
    `losses.Objective.readout` gives them.
    """
    generator, discriminator = build_models(config, conv_forms)
    m, t = config.model, config.train
    objective = losses.objective(t.loss)
    penalty = losses.GRADIENT_PENALTIES.get(t.gradient_penalty)
    policy = augment.parse_policy(t.augment)
    scales = num_scales(m.resolution, m.msg)
    real = batch["image"]
    real_labels = _real_labels(batch, m.num_classes)
    size = real.shape[1]
    if config.data.random_flip:
        real = random_flips(real, state.rng, state.step)
    if jnp.issubdtype(real.dtype, jnp.integer):
        real = real.astype(jnp.float32) / 127.5 - 1.0

    def generate(g_params, g_stats, z, labels):
        fake, updates = generator.apply({"params": g_params, "batch_stats": g_stats}, z,
                                        labels, train=True, mutable=["batch_stats"])
        return fake, updates["batch_stats"]

    def discriminate(d_params, d_stats, pyramid, labels):
        outputs, updates = discriminator.apply({"params": d_params, "batch_stats": d_stats},
                                               pyramid, labels, train=True,
                                               mutable=["batch_stats"])
        return outputs, updates.get("batch_stats", {})

    def augmented(pyramid: Pyramid, use: int) -> Pyramid:
        if not policy:
            return pyramid
        key = stream_key(state.rng, state.step, AUGMENT_STREAM, use)
        return augment.diff_augment(pyramid, policy, key)

    def d_loss_fn(d_params, d_stats, real_pyramid, fake_pyramid, real_classes, fake_classes,
                  index):
        real_outputs, d_stats = discriminate(d_params, d_stats, real_pyramid, real_classes)
        fake_outputs, d_stats = discriminate(d_params, d_stats, fake_pyramid, fake_classes)
        loss = objective.d_loss(real_outputs, fake_outputs, t.label_smoothing)
        weighted_penalty = jnp.zeros(())
        if penalty is not None:
            critic = lambda pyramid: discriminate(d_params, d_stats, pyramid,  # noqa: E731
                                                  real_classes)
            value, d_stats = penalty(critic, real_pyramid, fake_pyramid,
                                     stream_key(state.rng, state.step, PENALTY_STREAM, index))
            weighted_penalty = t.gp_weight * value
            loss = loss + weighted_penalty
        return loss, (d_stats, objective.readout(real_outputs).mean(),
                      objective.readout(fake_outputs).mean(), weighted_penalty)

    d, g_stats = state.d, state.g.batch_stats
    d_metrics = []
    for i in range(t.d_steps):
        z = latent_batch(state.rng, state.step, i, size, m.nz)
        fake_labels = (label_batch(state.rng, state.step, i, size, m.num_classes)
                       if m.num_classes else None)
        if latent_sharding is not None:
            z = jax.lax.with_sharding_constraint(z, latent_sharding)
            if fake_labels is not None:
                fake_labels = jax.lax.with_sharding_constraint(fake_labels, latent_sharding)
        if i == t.d_steps - 1:
            fake, g_pullback, g_stats = jax.vjp(
                functools.partial(generate, g_stats=g_stats, z=z, labels=fake_labels),
                state.g.params, has_aux=True)
        else:
            fake, g_stats = generate(state.g.params, g_stats, z, fake_labels)
        real_pyramid = augmented(image_pyramid(real[i], scales), 2 * i)
        fake_pyramid = augmented(jax.lax.stop_gradient(fake), 2 * i + 1)
        grad_fn = jax.value_and_grad(d_loss_fn, has_aux=True)
        (loss_d, (d_stats, d_real, d_fake, weighted_penalty)), d_grads = grad_fn(
            d.params, d.batch_stats, real_pyramid, fake_pyramid,
            None if real_labels is None else real_labels[i], fake_labels, i)
        d = d.apply_gradients(grads=d_grads, batch_stats=d_stats)
        d_metrics.append((loss_d, d_real, d_fake, weighted_penalty))

    def g_loss_fn(fake_pyramid):
        outputs, d_stats = discriminate(d.params, d.batch_stats,
                                        augmented(fake_pyramid, 2 * t.d_steps), fake_labels)
        return objective.g_loss(outputs), (d_stats, objective.readout(outputs).mean())

    (loss_g, (d_stats, d_fake_after)), fake_grads = jax.value_and_grad(
        g_loss_fn, has_aux=True)(fake)
    (g_grads,) = g_pullback(fake_grads)
    g = state.g.apply_gradients(grads=g_grads, batch_stats=g_stats)
    d = d.replace(batch_stats=d_stats)

    ema = state.ema
    if ema is not None:
        # Averaged weights need BatchNorm statistics of their own: a forward pass of the
        # averaged G on this step's latents keeps its running averages current.
        decay = ema_decay_at(t.ema_decay, state.step)
        ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                                  ema["params"], g.params)
        _, ema_stats = generate(ema_params, ema["batch_stats"], z, fake_labels)
        ema = {"params": ema_params, "batch_stats": ema_stats}

    loss_d, d_real, d_fake, weighted_penalty = (
        jnp.mean(jnp.stack(v)) for v in zip(*d_metrics, strict=True))
    metrics = {"loss_d": loss_d, "loss_g": loss_g, "d_real": d_real,
               "d_fake_before": d_fake, "d_fake_after": d_fake_after}
    if penalty is not None:
        metrics["penalty"] = weighted_penalty
    new_state = GANState(g=g, d=d, ema=ema, rng=state.rng, step=state.step + 1)
    return new_state, metrics


def _real_labels(batch: Batch, num_classes: int) -> jax.Array | None:
    if not num_classes:
        return None
    if "label" not in batch:
        raise ValueError(f"config.model.num_classes={num_classes} needs batches with labels; "
                         f"this batch has only {sorted(batch)}")
    return batch["label"].astype(jnp.int32)


def make_train_step(config: Any, mesh: Mesh, conv_forms: Any = None
                    ) -> Callable[[GANState, Batch], tuple[GANState, Metrics]]:
    """The step jitted over `mesh`: state replicated and donated, batches sharded; its
    strided convolutions in `conv_forms` (None: this host's; see build_models)."""
    step = functools.partial(train_step, config=config,
                             latent_sharding=parallel.batch_sharded(mesh),
                             conv_forms=conv_forms)
    return jax.jit(step,
                   in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh, 1)),
                   out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
                   donate_argnums=0)


def all_finite(state: GANState) -> jax.Array:
    """Whether all weights and statistics of both networks and the EMA are finite."""
    leaves = jax.tree.leaves((state.g.params, state.d.params, state.g.batch_stats,
                              state.d.batch_stats, state.ema))
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


def generate_images(state: GANState, z: jax.Array, config: Any, use_ema: bool = True,
                    labels: jax.Array | None = None) -> jax.Array:
    """Full-resolution images from G in inference mode (EMA weights when kept), of the
    classes `labels` where the model is conditional. In float32 whatever the training dtype:
    training's grids and FID, `sample` and the exported generators then agree image for
    image."""
    generator, _ = build_models(config, dtype=jnp.float32)
    variables = (state.ema if use_ema and state.ema is not None
                 else {"params": state.g.params, "batch_stats": state.g.batch_stats})
    return generator.apply(variables, z, labels, train=False)[0]
