"""One train_step: what it updates, its losses against a direct computation, k, EMA,
objectives and penalties by name, and exact resumes with augmentation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dcgan_jax import augment, checkpoints, parallel
from dcgan_jax import step as step_lib

from test_losses import FORMULAS
from tiny_config import tiny_config


def setup(config, seed=0):
    mesh = parallel.make_mesh()
    state = step_lib.create_train_state(config, mesh, total_steps=10)
    shape = (config.train.d_steps, config.train.batch_size, 32, 32, 1)
    real = jax.random.uniform(jax.random.PRNGKey(seed), shape, minval=-1.0, maxval=1.0)
    return mesh, state, real


def copy(tree):
    return jax.tree.map(np.array, tree)


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def direct_d_loss(config, state, real, smoothing):
    """D's loss of the first D update, computed outside the step with numpy formulas."""
    generator, discriminator = step_lib.build_models(config)
    z = step_lib.latent_batch(state.rng, state.step, 0, config.train.batch_size,
                              config.model.nz)
    g_vars = {"params": state.g.params, "batch_stats": state.g.batch_stats}
    fake, _ = generator.apply(g_vars, z, train=True, mutable=["batch_stats"])
    d_vars = {"params": state.d.params, "batch_stats": state.d.batch_stats}
    real_logits, _ = discriminator.apply(d_vars, (real[0],), train=True, mutable=["batch_stats"])
    fake_logits, _ = discriminator.apply(d_vars, fake, train=True, mutable=["batch_stats"])
    r, f = np.asarray(real_logits, np.float64), np.asarray(fake_logits, np.float64)
    target = 1.0 - smoothing
    loss_real = -(target * log_sigmoid(r) + (1 - target) * log_sigmoid(-r)).mean()
    loss_fake = -log_sigmoid(-f).mean()
    return loss_real + loss_fake, 1 / (1 + np.exp(-r)), 1 / (1 + np.exp(-f))


def test_one_step_changes_both_networks(config):
    mesh, state, real = setup(config)
    before = copy((state.g.params, state.d.params, state.g.batch_stats, state.d.batch_stats))
    new_state, metrics = step_lib.make_train_step(config, mesh)(state, {"image": real})
    after = copy((new_state.g.params, new_state.d.params, new_state.g.batch_stats,
                  new_state.d.batch_stats))
    for old, new in zip(before, after, strict=True):
        changed = [not np.array_equal(a, b)
                   for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new), strict=True)]
        assert all(changed), "every leaf of both networks and their BatchNorm stats moves"
    assert int(new_state.step) == 1
    assert set(metrics) == {"loss_d", "loss_g", "d_real", "d_fake_before", "d_fake_after"}
    assert float(metrics["d_fake_after"]) < float(metrics["d_fake_before"]), \
        "after its update D scores the same fakes as less real"


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_d_loss_matches_direct_computation(smoothing):
    config = tiny_config(train__label_smoothing=smoothing)
    mesh, state, real = setup(config)
    expected, d_real, d_fake = direct_d_loss(config, state, real, smoothing)
    _, metrics = step_lib.make_train_step(config, mesh)(state, {"image": real})
    assert float(metrics["loss_d"]) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["d_real"]) == pytest.approx(d_real.mean(), rel=1e-5)
    assert float(metrics["d_fake_before"]) == pytest.approx(d_fake.mean(), rel=1e-5)


def test_label_smoothing_changes_only_the_real_target():
    losses = {}
    for smoothing in (0.0, 0.2):
        config = tiny_config(train__label_smoothing=smoothing)
        mesh, state, real = setup(config)
        _, metrics = step_lib.make_train_step(config, mesh)(state, {"image": real})
        losses[smoothing] = jax.device_get(metrics)
    assert losses[0.2]["loss_d"] != pytest.approx(losses[0.0]["loss_d"], rel=1e-3)
    # Before the D update nothing differs between the runs.
    assert losses[0.2]["d_real"] == pytest.approx(losses[0.0]["d_real"], rel=1e-6)


def test_d_steps_update_d_k_times_on_their_own_batches():
    config = tiny_config(train__d_steps=3)
    mesh, state, real = setup(config)
    step = step_lib.make_train_step(config, mesh)
    new_state, metrics = step(state, {"image": real})
    assert int(new_state.d.step) == 3 and int(new_state.g.step) == 1
    # Each D update reads its own batch: changing only the last one changes the result.
    _, state2, _ = setup(config)
    _, metrics2 = step(state2, {"image": real.at[2].set(-real[2])})
    assert float(metrics2["loss_d"]) != pytest.approx(float(metrics["loss_d"]), rel=1e-6)
    # The first of the k updates is the plain loss on real[0].
    _, state3, _ = setup(config)
    first, _, _ = direct_d_loss(config, state3, real, 0.0)
    config1 = tiny_config()
    _, state1, _ = setup(config1)
    _, metrics1 = step_lib.make_train_step(config1, mesh)(state1, {"image": real[:1]})
    assert float(metrics1["loss_d"]) == pytest.approx(first, rel=1e-5)


def test_ema_follows_formula():
    config = tiny_config(train__ema_decay=0.5)
    mesh, state, real = setup(config)
    step = step_lib.make_train_step(config, mesh)
    ema = copy(state.ema["params"])
    for i in range(3):  # ramped decays 1/10, 2/11, 3/12, all below the 0.5 cap
        decay = min(0.5, (1 + i) / (10 + i))
        state, _ = step(state, {"image": real})
        current = copy(state.g.params)
        ema = jax.tree.map(lambda e, p, d=decay: d * e + (1 - d) * p, ema, current)
        for got, want in zip(jax.tree.leaves(copy(state.ema["params"])), jax.tree.leaves(ema),
                             strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert float(step_lib.ema_decay_at(0.999, 10**6)) == pytest.approx(0.999)


def test_ema_generator_keeps_its_own_batchnorm_statistics():
    config = tiny_config(train__ema_decay=0.5)
    mesh, state, real = setup(config)
    generator, _ = step_lib.build_models(config)
    ema_before = copy(state.ema)
    z = step_lib.latent_batch(state.rng, state.step, 0, config.train.batch_size,
                              config.model.nz)
    state, _ = step_lib.make_train_step(config, mesh)(state, {"image": real})
    # The running statistics move as one train-mode pass of the averaged weights on z.
    _, expected = generator.apply({"params": state.ema["params"],
                                   "batch_stats": ema_before["batch_stats"]}, z, train=True,
                                  mutable=["batch_stats"])
    for got, want in zip(jax.tree.leaves(copy(state.ema["batch_stats"])),
                         jax.tree.leaves(copy(expected["batch_stats"])), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_no_ema_state_when_disabled(config):
    _, state, _ = setup(config)
    assert state.ema is None


def test_uint8_batches_are_scaled_on_device(config):
    mesh, state, real = setup(config)
    as_uint8 = jnp.round((real + 1) * 127.5).astype(jnp.uint8)
    _, from_uint8 = step_lib.make_train_step(config, mesh)(state, {"image": as_uint8})
    _, state, _ = setup(config)
    rescaled = as_uint8.astype(jnp.float32) / 127.5 - 1
    _, from_float = step_lib.make_train_step(config, mesh)(state, {"image": rescaled})
    assert float(from_uint8["loss_d"]) == pytest.approx(float(from_float["loss_d"]), rel=1e-6)


def test_lr_decay_reaches_zero():
    config = tiny_config(train__lr_decay=True, train__lr_d=4e-4)
    rates = step_lib.learning_rate_fns(config, 100)
    assert float(rates["lr_g"](0)) == pytest.approx(2e-4)
    assert float(rates["lr_g"](50)) == pytest.approx(1e-4)
    assert float(rates["lr_d"](50)) == pytest.approx(2e-4)
    assert float(rates["lr_g"](100)) == 0.0


def test_d_decay_spans_the_run_whatever_d_steps():
    # D's optimizer counts d_steps updates per train step; its rate still follows the step.
    config = tiny_config(train__lr_decay=True, train__d_steps=3)
    _, d_tx = step_lib._optimizers(config, total_steps=10)
    params = {"w": jnp.zeros(())}
    state = d_tx.init(params)
    updates = []
    for _ in range(15):  # 5 train steps of 3 D updates each
        update, state = d_tx.update({"w": jnp.ones(())}, state, params)
        updates.append(abs(float(update["w"])))
    assert updates[14] == pytest.approx(2e-4 * 0.6, rel=1e-3)  # step 4 of 10: rate 60%


def test_bfloat16_keeps_float32_state_and_stays_close():
    """config.dtype='bfloat16' computes in bf16 but keeps parameters, optimizer state and
    BatchNorm statistics in float32; over a few steps it tracks the float32 run."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        config = tiny_config(dtype=dtype)
        mesh, state, _ = setup(config)
        train_step = step_lib.make_train_step(config, mesh)
        losses = []
        for i in range(4):
            real = jax.random.uniform(jax.random.PRNGKey(100 + i), (1, 16, 32, 32, 1),
                                      minval=-1.0, maxval=1.0)
            state, metrics = train_step(state, {"image": real})
            losses.append([float(metrics[k]) for k in ("loss_d", "loss_g")])
        runs[dtype] = (copy(state), np.array(losses))
    state16, losses16 = runs["bfloat16"]
    state32, losses32 = runs["float32"]
    for leaf in jax.tree.leaves((state16.g, state16.d)):
        assert leaf.dtype in (np.float32, np.int32), leaf.dtype
    np.testing.assert_allclose(losses16, losses32, atol=0.05)
    for new16, new32 in zip(jax.tree.leaves(state16.g.params), jax.tree.leaves(state32.g.params),
                            strict=True):
        assert np.abs(new16 - new32).max() <= 0.02 * np.abs(new32).max() + 1e-3
    assert not all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(state16.g.params), jax.tree.leaves(state32.g.params), strict=True)), \
        "bfloat16 must actually change the arithmetic"


def todays_step(state, real, config):
    """The train step as it was before objectives came by name, without flips and EMA: `ns`
    must train bit for bit as it did."""
    generator, discriminator = step_lib.build_models(config)
    t = config.train
    batch = real.shape[1]

    def bce(logits, target):
        return optax.sigmoid_binary_cross_entropy(logits, jnp.full_like(logits, target)).mean()

    def generate(g_params, g_stats, z):
        fake, updates = generator.apply({"params": g_params, "batch_stats": g_stats}, z,
                                        train=True, mutable=["batch_stats"])
        return fake, updates["batch_stats"]

    def discriminate(d_params, d_stats, pyramid):
        logits, updates = discriminator.apply({"params": d_params, "batch_stats": d_stats},
                                              pyramid, train=True, mutable=["batch_stats"])
        return logits, updates["batch_stats"]

    def d_loss_fn(d_params, d_stats, real_pyramid, fake_pyramid):
        real_logits, d_stats = discriminate(d_params, d_stats, real_pyramid)
        fake_logits, d_stats = discriminate(d_params, d_stats, fake_pyramid)
        loss = bce(real_logits, 1.0 - t.label_smoothing) + bce(fake_logits, 0.0)
        return loss, (d_stats, jax.nn.sigmoid(real_logits).mean(),
                      jax.nn.sigmoid(fake_logits).mean())

    d, g_stats = state.d, state.g.batch_stats
    d_metrics = []
    for i in range(t.d_steps):
        z = step_lib.latent_batch(state.rng, state.step, i, batch, config.model.nz)
        if i == t.d_steps - 1:
            fake, g_pullback, g_stats = jax.vjp(
                functools.partial(generate, g_stats=g_stats, z=z), state.g.params, has_aux=True)
        else:
            fake, g_stats = generate(state.g.params, g_stats, z)
        grad_fn = jax.value_and_grad(d_loss_fn, has_aux=True)
        (loss_d, (d_stats, d_real, d_fake)), d_grads = grad_fn(
            d.params, d.batch_stats, (real[i],), jax.lax.stop_gradient(fake))
        d = d.apply_gradients(grads=d_grads, batch_stats=d_stats)
        d_metrics.append((loss_d, d_real, d_fake))

    def g_loss_fn(fake_pyramid):
        logits, d_stats = discriminate(d.params, d.batch_stats, fake_pyramid)
        return bce(logits, 1.0), (d_stats, jax.nn.sigmoid(logits).mean())

    (loss_g, (d_stats, d_fake_after)), fake_grads = jax.value_and_grad(
        g_loss_fn, has_aux=True)(fake)
    (g_grads,) = g_pullback(fake_grads)
    g = state.g.apply_gradients(grads=g_grads, batch_stats=g_stats)
    d = d.replace(batch_stats=d_stats)
    loss_d, d_real, d_fake = (jnp.mean(jnp.stack(v)) for v in zip(*d_metrics, strict=True))
    metrics = {"loss_d": loss_d, "loss_g": loss_g, "d_real": d_real,
               "d_fake_before": d_fake, "d_fake_after": d_fake_after}
    return state.replace(g=g, d=d, step=state.step + 1), metrics


def test_ns_trains_bit_for_bit_as_before():
    config = tiny_config(train__d_steps=2, train__label_smoothing=0.1)
    _, state, real = setup(config)
    assert state.g.apply_fn is None and state.d.apply_fn is None, "states hold arrays only"
    ours, theirs = state, jax.tree.map(jnp.copy, state)
    new_step = jax.jit(functools.partial(step_lib.train_step, config=config))
    old_step = jax.jit(functools.partial(todays_step, config=config))
    for _ in range(3):
        ours, our_metrics = new_step(ours, {"image": real})
        theirs, their_metrics = old_step(theirs, real)
    for name, value in their_metrics.items():
        assert float(our_metrics[name]) == float(value), name
    for got, want in zip(jax.tree.leaves(copy(ours)), jax.tree.leaves(copy(theirs)), strict=True):
        np.testing.assert_array_equal(got, want)


def test_first_d_update_of_a_critic_matches_direct_computation():
    """WGAN-GP with a spectrally normalised critic and every augmentation: D's loss, its
    penalty and the raw scores it logs, against numpy from the step's own keys."""
    config = tiny_config(train__loss="wgan", train__gradient_penalty="wgan_gp",
                         model__d_norm="spectral", train__augment="color,translation,cutout")
    mesh, state, real = setup(config)
    generator, discriminator = step_lib.build_models(config)
    batch, policy = config.train.batch_size, augment.parse_policy(config.train.augment)
    z = step_lib.latent_batch(state.rng, state.step, 0, batch, config.model.nz)
    fake, _ = generator.apply({"params": state.g.params, "batch_stats": state.g.batch_stats},
                              z, train=True, mutable=["batch_stats"])
    keys = [step_lib.stream_key(state.rng, state.step, step_lib.AUGMENT_STREAM, use)
            for use in (0, 1)]
    real_pyramid = augment.diff_augment((real[0],), policy, keys[0])
    fake_pyramid = augment.diff_augment(fake, policy, keys[1])

    def critic(pyramid, stats):
        scores, updates = discriminator.apply({"params": state.d.params, "batch_stats": stats},
                                              pyramid, train=True, mutable=["batch_stats"])
        return scores, updates["batch_stats"]

    # The power iteration advances with each pass, as in the step: reals, fakes, penalty.
    real_scores, stats = critic(real_pyramid, state.d.batch_stats)
    fake_scores, stats = critic(fake_pyramid, stats)
    e = jax.random.uniform(step_lib.stream_key(state.rng, state.step, step_lib.PENALTY_STREAM, 0),
                           (batch, 1, 1, 1))
    between = (e * real_pyramid[0] + (1 - e) * fake_pyramid[0],)
    (grads,) = jax.grad(lambda p: critic(p, stats)[0].sum())(between)
    norms = np.sqrt((np.asarray(grads, np.float64) ** 2).reshape(batch, -1).sum(axis=1))
    penalty = config.train.gp_weight * ((norms - 1) ** 2).mean()
    r, f = np.asarray(real_scores, np.float64), np.asarray(fake_scores, np.float64)
    expected = FORMULAS["wgan"][0](r, f, 0.0) + penalty

    _, metrics = step_lib.make_train_step(config, mesh)(state, {"image": real})
    assert float(metrics["penalty"]) == pytest.approx(penalty, rel=1e-4)
    assert float(metrics["loss_d"]) == pytest.approx(expected, rel=1e-4)
    assert float(metrics["d_real"]) == pytest.approx(r.mean(), rel=1e-4, abs=1e-6)
    assert float(metrics["d_fake_before"]) == pytest.approx(f.mean(), rel=1e-4, abs=1e-6)


def resumed_and_unbroken(config, mesh, state, batches, folder):
    """The state after all `batches` unbroken, and after half of them, a checkpoint in
    `folder`, a restore and the rest."""
    train_step = step_lib.make_train_step(config, mesh)
    first = jax.tree.map(jnp.copy, state)  # the step donates its state
    unbroken = state
    for batch in batches:
        unbroken, _ = train_step(unbroken, batch)
    half = len(batches) // 2
    for batch in batches[:half]:
        first, _ = train_step(first, batch)
    manager = checkpoints.make_manager(str(folder))
    checkpoints.save(manager, half, first)
    checkpoints.finish_saves(manager)
    restored = checkpoints.restore(checkpoints.make_manager(str(folder), read_only=True),
                                   step_lib.abstract_train_state(config, mesh, 10))
    # Onto the first state's tree, whose optimizers compare equal, so the step compiles once.
    resumed = jax.tree.unflatten(jax.tree.structure(first), jax.tree.leaves(restored))
    for batch in batches[half:]:
        resumed, _ = train_step(resumed, batch)
    return resumed, unbroken


def test_resume_with_augmentation_is_exact(tmp_path):
    """N steps, a checkpoint, a fresh state restored from it and N more steps give the state
    of 2N unbroken steps: augmentations, penalties and power iterations included."""
    config = tiny_config(train__loss="hinge", train__gradient_penalty="r1",
                         model__d_norm="spectral", train__augment="color,translation,cutout",
                         data__random_flip=True)
    mesh, state, _ = setup(config)
    assert "Conv_0/kernel/u" in state.d.batch_stats["SpectralNorm_0"]
    initial_stats = jax.tree.leaves(copy(state.d.batch_stats))
    batches = [{"image": jax.random.uniform(jax.random.PRNGKey(10 + i), (1, 16, 32, 32, 1),
                                            minval=-1.0, maxval=1.0)} for i in range(4)]
    resumed, unbroken = resumed_and_unbroken(config, mesh, state, batches, tmp_path)
    assert int(resumed.step) == 4
    for got, want in zip(jax.tree.leaves(copy(resumed)), jax.tree.leaves(copy(unbroken)),
                         strict=True):
        np.testing.assert_array_equal(got, want)
    assert not any(np.array_equal(a, b) for a, b in zip(
        initial_stats, jax.tree.leaves(copy(unbroken.d.batch_stats)), strict=True)), \
        "power iterations run"
