"""Class-conditional networks and their step: every conditioning with MSG, the objectives,
penalties, DiffAugment, EMA and bf16; labels that matter; the unconditional path bit for bit
as before; exact resumes."""

import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from test_step import resumed_and_unbroken

from dcgan_jax import checkpoints, models, names, parallel, strided_conv
from dcgan_jax import step as step_lib

from tiny_config import tiny_config

CLASSES = 10

# The unconditional step of the commit before conditioning (a4bd2ed), 3 steps on fixed
# uint8 batches, digested over the whole state and the metrics after each step, in the
# tests' XLA mode and with fixed CPU forms of the strided convolutions.
TODAYS_DIGESTS = {
    "plain": "e4f46a44eb132ee58155781f86d19f922572e3a9fb184cf4ea8e08341fd0025f",
    "msg_ema_r1_augment": "ccb91e0d9d48fb8f6cc8f293016bee23a56364ff90ade6230ab1412d77de1903",
}
FIXED_FORMS = strided_conv.CpuForms(kernel_grad_chunk_bytes=2 << 20,
                                    kernel_grad_wide_minor=False)


def conditional(**overrides):
    return tiny_config(**{"model__num_classes": CLASSES, **overrides})


def batches(config, count, seed=0):
    rng = np.random.default_rng(seed)
    shape = (config.train.d_steps, config.train.batch_size, 32, 32, 1)
    return [{"image": rng.integers(0, 256, shape, dtype=np.uint8),
             "label": rng.integers(0, CLASSES, shape[:2], dtype=np.int32)}
            for _ in range(count)]


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("name,overrides", [
    ("plain", {}),
    ("msg_ema_r1_augment", dict(model__msg=True, model__d_norm="spectral",
                                train__gradient_penalty="r1", train__ema_decay=0.99,
                                train__augment="color,translation", train__d_steps=2,
                                data__random_flip=True)),
])
def test_unconditional_step_is_bit_for_bit_todays(name, overrides):
    """num_classes=0 builds today's networks and step: labels in the batch are ignored."""
    config = tiny_config(**overrides)
    mesh = parallel.make_mesh()
    state = step_lib.create_train_state(config, mesh, total_steps=10)
    shape = (config.train.d_steps, config.train.batch_size, 32, 32, 1)
    batch = {"image": np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8),
             "label": np.zeros(shape[:2], np.int32)}
    step = step_lib.make_train_step(config, mesh, FIXED_FORMS)
    digest = hashlib.sha256()
    for _ in range(3):
        state, metrics = step(state, batch)
        for leaf in leaves((state, metrics)):
            digest.update(leaf.tobytes())
    assert digest.hexdigest() == TODAYS_DIGESTS[name]


def test_names_agree_with_the_registries():
    assert tuple(models.FAMILIES) == names.MODEL_FAMILIES


@pytest.mark.parametrize("g_cond", names.G_CONDITIONINGS)
def test_generator_draws_the_class_it_is_given(g_cond):
    generator = models.Generator(resolution=32, channels=1, base_channels=8, msg=True,
                                 num_classes=CLASSES, cond=g_cond)
    z = jnp.tile(jax.random.normal(jax.random.PRNGKey(0), (1, 16)), (CLASSES, 1))
    labels = jnp.arange(CLASSES, dtype=jnp.int32)
    variables = generator.init(jax.random.PRNGKey(1), z, labels, train=False)
    pyramid = generator.apply(variables, z, labels, train=False)
    assert [p.shape for p in pyramid] == [(CLASSES, s, s, 1) for s in (32, 16, 8, 4)]
    images = np.asarray(pyramid[0])
    assert all(not np.array_equal(images[0], images[k]) for k in range(1, CLASSES)), \
        "one z, ten classes: ten images"
    weights = jax.nn.one_hot(labels, CLASSES)
    np.testing.assert_array_equal(
        np.asarray(generator.apply(variables, z, weights, train=False)[0]), images)
    with pytest.raises(ValueError, match="num_classes=10"):
        generator.apply(variables, z, train=False)


@pytest.mark.parametrize("d_cond", names.D_CONDITIONINGS)
@pytest.mark.parametrize("norm", names.D_NORMS)
def test_discriminator_scores_depend_on_the_class(d_cond, norm):
    discriminator = models.Discriminator(resolution=32, base_channels=8, msg=True, norm=norm,
                                         num_classes=CLASSES, cond=d_cond)
    images = jax.random.uniform(jax.random.PRNGKey(0), (4, 32, 32, 1), minval=-1, maxval=1)
    pyramid = models.image_pyramid(images, 4)
    variables = discriminator.init(jax.random.PRNGKey(1), pyramid, jnp.zeros(4, jnp.int32),
                                   train=False)
    scores = [discriminator.apply(variables, pyramid, jnp.full(4, k, jnp.int32), train=False)
              for k in (0, 1)]
    assert scores[0].shape == (4,)
    assert np.abs(np.asarray(scores[0] - scores[1])).max() > 1e-4


def test_conditional_step_uses_real_labels_and_draws_uniform_fake_classes(config):
    config = conditional()
    mesh = parallel.make_mesh()
    batch = batches(config, 1)[0]
    state = step_lib.create_train_state(config, mesh, total_steps=10)
    step = step_lib.make_train_step(config, mesh)
    first, _ = step(jax.tree.map(jnp.copy, state), batch)
    relabelled, _ = step(state, {**batch, "label": (batch["label"] + 1) % CLASSES})
    assert any(not np.array_equal(a, b) for a, b in zip(
        leaves(first.d.params), leaves(relabelled.d.params), strict=True))
    drawn = step_lib.label_batch(first.rng, jnp.int32(5), 0, 10_000, CLASSES)
    counts = np.bincount(np.asarray(drawn), minlength=CLASSES)
    assert counts.min() > 900 and counts.max() < 1100
    np.testing.assert_array_equal(
        drawn, step_lib.label_batch(first.rng, jnp.int32(5), 0, 10_000, CLASSES))
    with pytest.raises(ValueError, match="needs batches with labels"):
        step(first, {"image": batch["image"]})


@pytest.mark.parametrize("overrides", [
    dict(model__g_cond="concat", model__d_cond="concat"),
    dict(model__g_cond="cbn", model__d_cond="projection", model__msg=True,
         model__d_norm="spectral", train__loss="hinge", train__gradient_penalty="r1",
         train__augment="color,translation,cutout", train__ema_decay=0.9),
    dict(model__g_cond="concat", model__d_cond="projection", model__d_norm="none",
         train__loss="wgan", train__gradient_penalty="wgan_gp", dtype="bfloat16"),
])
def test_conditional_step_trains_with_every_option(overrides):
    config = conditional(**overrides)
    mesh = parallel.make_mesh()
    state = step_lib.create_train_state(config, mesh, total_steps=10)
    initial = leaves(state.g.params)
    initial_params = jax.tree.map(np.asarray, state.g.params)
    step = step_lib.make_train_step(config, mesh)
    for batch in batches(config, 2):
        state, metrics = step(state, batch)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert all(not np.array_equal(a, b)
               for a, b in zip(initial, leaves(state.g.params), strict=True))
    if state.ema is not None:
        def gains(params):
            return np.asarray(params["ClassBatchNorm_0"]["gain"]["embedding"])
        averaged = gains(state.ema["params"])
        assert not np.array_equal(averaged, gains(initial_params)), "the average moves"
        assert not np.array_equal(averaged, gains(state.g.params)), "and lags G's gains"


def test_conditional_resume_is_exact(tmp_path):
    config = conditional(model__msg=True, train__ema_decay=0.9)
    mesh = parallel.make_mesh()
    state = step_lib.create_train_state(config, mesh, total_steps=10)
    resumed, unbroken = resumed_and_unbroken(config, mesh, state, batches(config, 4, seed=1),
                                             tmp_path)
    assert int(resumed.step) == 4
    for got, want in zip(leaves(resumed), leaves(unbroken), strict=True):
        np.testing.assert_array_equal(got, want)


def test_labelled_model_on_unlabelled_or_other_classes_is_one_line(tmp_path):
    from dcgan_jax import config as config_lib
    from dcgan_jax import data, train
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(flat / "0.png")
    config = conditional(dataset=f"folder:{flat}")
    with pytest.raises(config_lib.ConfigError) as refused:
        train.check_labels(config, data.open_source(config.dataset))
    assert "\n" not in str(refused.value)
    assert "config.model.num_classes=10 needs labels" in str(refused.value)
    assert f"config.dataset='folder:{flat}' has none" in str(refused.value)
    config = conditional(model__num_classes=3)
    with pytest.raises(config_lib.ConfigError,
                       match=r"num_classes=3 differs from the 10 classes of config.dataset="
                             r"'demo:mnist'; use --config.model.num_classes=10"):
        train.check_labels(config, data.open_source(config.dataset))


def test_a_resume_over_other_classes_is_refused_and_keeps_the_run(tmp_path):
    from dcgan_jax import train

    from helpers import coloured_class_folder, tree_digest
    folder = coloured_class_folder(str(tmp_path / "classes"), per_class=8, unreadable=False)
    workdir = str(tmp_path / "run")
    config = tiny_config(dataset=f"folder:{folder}", model__channels=3, model__num_classes=3,
                         train__batch_size=8, train__num_steps=2, ckpt_every=2)
    train.train_and_evaluate(config, workdir)
    before = tree_digest(workdir)
    os.rename(os.path.join(folder, "c2"), os.path.join(folder, "c9"))
    config.train.num_steps = 4
    with pytest.raises(checkpoints.IncompatibleCheckpointError) as refused:
        train.train_and_evaluate(config, workdir)
    message = str(refused.value)
    assert "\n" not in message
    assert "has the classes [c0, c1, c9], and its checkpoints were trained on [c0, c1, c2]" \
        in message
    assert tree_digest(workdir) == before


def test_checkpoints_of_the_commit_before_labels_resume(tmp_path, capsys):
    """A run saved by a4bd2ed (tiny config, 3 steps, tests/data/run_a4bd2ed) resumes here:
    the same trees, the same data position and record of its dataset."""
    import shutil

    from dcgan_jax import config as config_lib
    from dcgan_jax import train

    from tiny_config import TEST_CACHE
    workdir = tmp_path / "run"
    shutil.copytree(os.path.join(os.path.dirname(__file__), "data", "run_a4bd2ed"), workdir)
    config = config_lib.from_json((workdir / "config.json").read_text())
    config.data.cache_dir = TEST_CACHE
    config.train.num_steps = 4
    state = train.train_and_evaluate(config, str(workdir))
    out = capsys.readouterr().out
    assert "Resumed from step 3" in out and "Changed since" not in out
    assert int(state.step) == 4
