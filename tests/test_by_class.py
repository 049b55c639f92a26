"""Sampling and evaluation by class on a class-conditional checkpoint made directly (no
training): grids, files and interpolations of given classes, the classes figure, matching
real images, class-balanced FID and every metric class by class (intra-class FID and
the others)."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import flagsaver
from PIL import Image

from dcgan_jax import checkpoints, data, images, parallel, sample
from dcgan_jax import config as config_lib
from dcgan_jax import step as step_lib
from dcgan_jax.evaluation import evaluator as evaluator_lib
from dcgan_jax.evaluation import features, metrics, quality
from dcgan_jax.evaluation.evaluator import Evaluator, IntraClassEvaluator

from helpers import random_fid_weights, run
from tiny_config import tiny_config

# Per class, a few images for 64-d features: FID warns of its singular covariances.
pytestmark = pytest.mark.filterwarnings("ignore:.*the covariance is singular:UserWarning")

CLASSES = 10
# Saved in the checkpoint's dataset record: sampling names classes by them.
CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TILE = 34  # 32 pixels and the grid's 2-pixel padding


def save_run(workdir, config, class_names=None):
    """A workdir holding `config` and its initial state, whose class gains and biases are
    made far apart and whose last layer is scaled up (fresh images are all mid-grey), so
    that classes differ by more than rounding; returns the state."""
    state = step_lib.create_train_state(config, parallel.make_mesh(), total_steps=1)
    rng = np.random.default_rng(0)
    last_layer = max(name for name in state.g.params if name.startswith("ConvTranspose"))

    def spread(path, leaf):
        names = jax.tree_util.keystr(path)
        if "gain" in names:
            return jnp.asarray(1 + 0.5 * rng.standard_normal(leaf.shape), leaf.dtype)
        if "bias" in names and "embedding" in names:
            return jnp.asarray(0.5 * rng.standard_normal(leaf.shape), leaf.dtype)
        return leaf * 30 if last_layer in names else leaf

    state = state.replace(g=state.g.replace(
        params=jax.tree_util.tree_map_with_path(spread, state.g.params)))
    (workdir / "config.json").write_text(config_lib.to_json(config))
    manager = checkpoints.make_manager(str(workdir))
    record = {"dataset": config.dataset} | ({"classes": class_names} if class_names else {})
    checkpoints.save(manager, int(state.step), state, dataset=record)
    checkpoints.finish_saves(manager)
    return state


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory):
    return random_fid_weights(str(tmp_path_factory.mktemp("weights") / "weights.npz"))


@pytest.fixture(scope="module")
def conditional(tmp_path_factory, fid_weights):
    """(workdir, config, state) of a 10-class model of the demo digits (with class-conditional
    BatchNorm, whose gains `save_run` spreads so that classes differ visibly)."""
    workdir = tmp_path_factory.mktemp("conditional")
    config = tiny_config(
        model__num_classes=CLASSES, model__g_cond="cbn", eval__fid_weights=fid_weights,
        eval__allow_unknown_weights=True, eval__dims=64, eval__num_samples=20,
        eval__num_reference=100, eval__batch_size=10, eval__kid_subsets=5,
        eval__kid_subset_size=10, data__cache_dir=str(workdir / "cache"))
    return workdir, config, save_run(workdir, config, CLASS_NAMES)


def generated(state, config, seed, indices, labels):
    """uint8 images of latents `indices` of `seed` at `labels`, without the sampler."""
    z = step_lib.latent_sequence(seed, jnp.asarray(indices), config.model.nz)
    return images.to_uint8(np.asarray(step_lib.generate_images(
        state, z, config, labels=jnp.asarray(labels))))[..., 0]


def tiles(path, rows, cols):
    grid = np.asarray(Image.open(path))
    assert grid.shape == (rows * TILE + 2, cols * TILE + 2)
    return np.stack([grid[2 + r * TILE:r * TILE + TILE, 2 + c * TILE:c * TILE + TILE]
                     for r in range(rows) for c in range(cols)])


def assert_close(got, want):
    """Equal within a grey level: jitted and eager generators round differently."""
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def run_sample(mode, capsys, **flag_values):
    with flagsaver.flagsaver(**flag_values):
        sample.main(["dcgan_jax.sample", mode])
    return capsys.readouterr().out


def test_grid_of_one_class(conditional, tmp_path, capsys):
    workdir, config, state = conditional
    out = tmp_path / "grid.png"
    run_sample("grid", capsys, workdir=str(workdir), seed=2, rows=2, cols=3, out=str(out),
               **{"class": 3})
    got = tiles(out, 2, 3)
    assert_close(got, generated(state, config, 2, np.arange(6), np.full(6, 3)))
    other = generated(state, config, 2, np.arange(6), np.full(6, 4))
    assert np.abs(got.astype(int) - other).max() > 20  # the class shows


def test_classes_figure_has_a_row_per_class_and_names_them(conditional, tmp_path, capsys):
    workdir, config, state = conditional
    out = tmp_path / "classes.png"
    printed = run_sample("classes", capsys, workdir=str(workdir), seed=1, cols=3,
                         out=str(out)).splitlines()
    assert printed == [str(out)] + [f"row {k}: {name}" for k, name in enumerate(CLASS_NAMES)]
    got = tiles(out, CLASSES, 3)
    labels = np.repeat(np.arange(CLASSES), 3)
    assert_close(got, generated(state, config, 1, np.tile(np.arange(3), CLASSES), labels))


def test_files_are_class_balanced_or_of_one_class(conditional, tmp_path, capsys):
    workdir, config, state = conditional
    balanced, of_seven = tmp_path / "balanced", tmp_path / "seven"
    said = run_sample("files", capsys, workdir=str(workdir), seed=4, num=12, batch_size=5,
                      out=str(balanced))
    assert "class-balanced (image i of class i mod 10)" in said
    files = np.stack([np.asarray(Image.open(balanced / f"{i:06d}.png")) for i in range(12)])
    assert_close(files, generated(state, config, 4, np.arange(12), np.arange(12) % CLASSES))
    said = run_sample("files", capsys, workdir=str(workdir), seed=4, num=2, out=str(of_seven),
                      **{"class": 7})
    assert "2 images of class 7 (seven)" in said
    files = np.stack([np.asarray(Image.open(of_seven / f"{i:06d}.png")) for i in range(2)])
    assert_close(files, generated(state, config, 4, np.arange(2), np.full(2, 7)))


def test_between_classes_at_a_fixed_latent(conditional, tmp_path, capsys):
    workdir, config, state = conditional
    frames = 4
    printed = run_sample("interpolate", capsys, workdir=str(workdir), seed=5, frames=frames,
                         between_classes=["2", "7"], out=str(tmp_path / "walk")).split()
    stem = tmp_path / "walk_classes_2-7"
    assert printed == [f"{stem}.png", f"{stem}.gif"]
    walk = tiles(f"{stem}.png", 1, frames + 1)
    ends = generated(state, config, 5, [0, 0], [2, 7])
    assert_close(walk[[0, frames]], ends)
    assert min(np.abs(walk[2].astype(int) - end).max() for end in ends) > 1  # between them

    # Pure class weights give the classes' own images, in floats.
    z = step_lib.latent_sequence(5, jnp.zeros(2, jnp.int32), config.model.nz)
    weights = sample.path_labels(np.array([2, 7]), frames, CLASSES)[[0, frames]]
    np.testing.assert_allclose(
        step_lib.generate_images(state, z, config, labels=jnp.asarray(weights)),
        step_lib.generate_images(state, z, config, labels=jnp.array([2, 7])), atol=1e-5)


def test_path_labels():
    assert sample.path_labels(None, 3, 0) is None
    same = sample.path_labels(np.array([4, 4, 4]), 2, CLASSES)
    assert same.dtype == np.int32 and same.tolist() == [4] * 5
    mixed = sample.path_labels(np.array([0, 2]), 2, 3)
    np.testing.assert_allclose(mixed, [[1, 0, 0], [0.5, 0, 0.5], [0, 0, 1]])


def test_real_images_of_the_samples_classes(conditional, tmp_path, monkeypatch):
    workdir, _, _ = conditional
    asked = []

    def recording(config, source, count, classes=None, real=data.sample_images):
        asked.append(classes)
        return real(config, source, count, classes)

    monkeypatch.setattr(data, "sample_images", recording)
    sampler = sample.Sampler(str(workdir))
    sample.write_real_vs_fake(sampler, str(tmp_path / "all.png"), 0, 4)
    sample.write_real_vs_fake(sampler, str(tmp_path / "six.png"), 0, 4, class_index=6)
    assert asked[0].tolist() == [i % CLASSES for i in range(16)]
    assert asked[1].tolist() == [6] * 16
    assert Image.open(tmp_path / "six.png").size == (1200, 640)


@pytest.mark.slow
def test_class_out_of_range_on_the_command_line(conditional):
    workdir, _, _ = conditional
    result = run(["-m", "dcgan_jax.sample", "grid", f"--workdir={workdir}", "--class=12"],
                 check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "dcgan_jax.sample: error: --class=12: class 12 is out of range; the run's classes "
        "are 0 to 9 (" + ", ".join(f"{k}: {n}" for k, n in enumerate(CLASS_NAMES)) + ")")


def test_class_flag_errors(conditional, tmp_path, capsys):
    workdir, _, _ = conditional

    def error(mode, **flag_values):
        with pytest.raises(SystemExit) as exit_info:
            run_sample(mode, capsys, **{"workdir": str(workdir), **flag_values})
        return str(exit_info.value.code)

    assert error("interpolate", between_classes=["3", "10"]).endswith(
        "--between_classes=3,10: class 10 is out of range; the run's classes are 0 to 9 "
        "(0: zero, 1: one, 2: two, 3: three, 4: four, 5: five, 6: six, 7: seven, 8: eight, "
        "9: nine)")
    assert error("interpolate", between_classes=["3"]).endswith(
        "--between_classes=3 must be two or more class numbers separated by commas, e.g. "
        "--between_classes=3,5")
    assert error("interpolate", between_classes=["3", "5"], **{"class": 1}).endswith(
        "give --class=K (a path within class K) or --between_classes, not both")
    assert error("plot", **{"class": 1}).endswith(
        "--class applies to grid, files, interpolate and real_vs_fake, not plot")

    unconditional = tmp_path / "unconditional"
    unconditional.mkdir()
    save_run(unconditional, tiny_config())
    assert error("grid", workdir=str(unconditional), **{"class": 1}).endswith(
        "--class applies to class-conditional runs, and this run's model is unconditional "
        "(config.model.num_classes=0); drop --class")
    assert error("classes", workdir=str(unconditional)).endswith(
        "the classes mode shows a class-conditional run's classes, and this run's model is "
        "unconditional (config.model.num_classes=0)")


@pytest.mark.slow  # the Inception over about 150 images
def test_class_balanced_fid_scores_the_files_samples(conditional):
    _, config, state = conditional
    source = data.open_source(config.dataset)
    evaluator = Evaluator(config, parallel.make_mesh(), source)
    fake = evaluator.extractor.of_samples(state, config, 12)
    files = generated(state, config, features.EVAL_SEED, np.arange(12), np.arange(12) % 10)
    np.testing.assert_allclose(fake, evaluator.extractor.of_images(files[..., None]),
                               rtol=1e-4, atol=1e-4)
    scores = evaluator(state)
    assert scores["fid"] > 0 and np.isfinite(scores["kid"])
    assert evaluator.describe(state) == "20 class-balanced samples of G vs 100 dataset images"


def with_eval(config, **fields):
    """A copy of `config` with config.eval `fields` changed (the fixture's is shared)."""
    config = config.copy_and_resolve_references()
    for name, value in fields.items():
        config.eval[name] = value
    return config


@pytest.mark.slow  # the Inception over 240 images
def test_per_class_values_are_each_class_metrics(conditional, monkeypatch, tmp_path):
    """Each class's values are metrics.score of its samples against its reference images,
    whose statistics (all the class's features up to its share of KID_REFERENCE_FEATURES, the
    first in the evaluation order) are cached a file per class."""
    _, config, state = conditional
    wanted = ("fid", "kid", "pr", "dc")
    config = with_eval(config, metrics=",".join(wanted), num_samples=40, batch_size=4)
    config.data.cache_dir = str(tmp_path / "cache")  # with this test's share kept
    monkeypatch.setattr(features, "KID_REFERENCE_FEATURES", 60)  # 6 of each class
    source = data.open_source(config.dataset)
    mesh = parallel.make_mesh()
    evaluator = IntraClassEvaluator(config, mesh, source)
    extractor, samples = evaluator.extractor, {}

    def recording(state, config, count, use_ema=True, class_index=None):
        found = of_samples(state, config, count, use_ema, class_index)
        samples[class_index] = extractor.pool(found)
        return found

    of_samples = extractor.of_samples
    monkeypatch.setattr(extractor, "of_samples", recording)
    batches = list(data.evaluation_batches(config, source, 100, 100))
    labels = np.concatenate([batch["label"] for batch in batches])
    real = extractor.of_batches([batch["image"] for batch in batches])
    assert [r.count for r in evaluator.references] == np.bincount(labels, minlength=10).tolist()
    assert re.fullmatch(r"Per-class reference: 100 images of demo:mnist in 10 classes "
                        r"\(\d+ to \d+ a class\), 64-d features, computed in [\d.]+ s and "
                        r"cached in .*fid_stats", evaluator.reference_line)
    scores = evaluator(state)
    assert evaluator.describe(state) == (
        "4 samples of each of 10 classes (40 in all) of G vs 100 dataset images")
    # Each class's 4 samples, as the evaluator scored them and as of_samples gives them.
    assert sorted(samples) == list(range(CLASSES))
    assert {len(found) for found in samples.values()} == {4}
    np.testing.assert_array_equal(samples[3], of_samples(state, config, 4, class_index=3))
    e = config.eval
    for label, values in enumerate(scores):
        reference = metrics.Statistics.of(real[labels == label], keep_features=6)
        want = metrics.score(wanted, samples[label], reference, None, e.kid_subsets,
                             e.kid_subset_size)
        assert sorted(values) == sorted(want) == sorted(
            ["fid", "kid", "kid_std", "precision", "recall", "density", "coverage"])
        assert values == pytest.approx(want, rel=1e-6), label
        assert values["fid"] > 0
    assert len({values["fid"] for values in scores}) == CLASSES  # each class its own

    again = IntraClassEvaluator(config, mesh, source)
    assert "read from" in again.reference_line
    for cached, computed in zip(again.references, evaluator.references, strict=True):
        np.testing.assert_array_equal(cached.mu, computed.mu)
        assert len(cached.features) == min(cached.count, 6)
        np.testing.assert_array_equal(cached.features, computed.features)
    assert any(cached.count > 6 for cached in again.references), "the share was kept"


class FakeExtractor:
    """Stands in for feature_extractor's: features and 1008 logits of each class's samples
    made up from the class index, without the network."""

    dims = 8

    def __init__(self, logits):
        self.has_logits = logits

    def of_samples(self, state, config, count, use_ema=True, class_index=None):
        rng = np.random.default_rng(class_index)
        return rng.standard_normal((count, self.dims + 1008 * self.has_logits), np.float32)

    def pool(self, found):
        return found[:, :self.dims]

    def logits(self, found):
        return found[:, self.dims:] if self.has_logits else None


def fake_references(counts, dims=FakeExtractor.dims):
    """class_reference_statistics's answer: classes of `counts` random features each."""
    def statistics(config, source, extractor, count):
        rng = np.random.default_rng(99)
        found = [metrics.Statistics.of(rng.standard_normal((n, dims)), keep_features=n)
                 for n in counts]
        return found, [f"/cache/fid_stats/class{k}.npz" for k in range(len(counts))], False
    return statistics


def test_per_class_inception_score_from_each_class_logits(conditional, monkeypatch):
    _, config, _ = conditional
    asked = []
    monkeypatch.setattr(evaluator_lib, "feature_extractor",
                        lambda config, mesh, logits=False: asked.append(logits)
                        or FakeExtractor(logits))
    monkeypatch.setattr(features, "class_reference_statistics", fake_references([12] * 10))
    config = with_eval(config, metrics="is,kid", num_samples=500)
    evaluator = IntraClassEvaluator(config, None, data.open_source(config.dataset))
    assert asked == [True]
    assert "read from /cache/fid_stats" in evaluator.reference_line
    scores = evaluator(None)
    for label, values in enumerate(scores):
        logits = FakeExtractor(True).of_samples(None, config, 50, class_index=label)[:, 8:]
        assert (values["is"], values["is_std"]) == quality.inception_score(logits)
        assert sorted(values) == ["is", "is_std", "kid", "kid_std"]
    assert evaluator.kid_subset_sizes == [10] * 10  # min(subset size, samples, reference)


def test_too_few_images_of_a_class_for_a_metric(conditional, monkeypatch):
    """Too few samples fail before the network loads, too few reference images name the
    class: one line each, with the fix."""
    _, config, _ = conditional
    source = data.open_source(config.dataset)

    def error(**fields):
        with pytest.raises(metrics.MetricError) as info:
            IntraClassEvaluator(with_eval(config, **fields), None, source)
        return str(info.value)

    monkeypatch.setattr(evaluator_lib, "feature_extractor", None)  # never reached
    assert error(metrics="fid,is", num_samples=495) == (
        "495 samples give each of the 10 classes 49; the Inception Score (5 in each of its 10 "
        "splits) needs at least 50 a class: give --num_samples=500 or more")
    assert error(metrics="kid,pr", num_samples=35) == (
        "35 samples give each of the 10 classes 3; precision/recall (k=3) needs at least 4 a "
        "class: give --num_samples=40 or more")
    assert error(metrics="fid", num_samples=19).endswith(
        "intra-class FID needs at least 2 a class: give --num_samples=20 or more")
    monkeypatch.setattr(evaluator_lib, "feature_extractor",
                        lambda config, mesh, logits=False: FakeExtractor(logits))
    monkeypatch.setattr(features, "class_reference_statistics",
                        fake_references([5, 5, 3, 5, 5, 5, 5, 5, 5, 5]))
    assert error(metrics="fid,dc", num_samples=40) == (
        "class 2 (2) has 3 image(s) among the 48 reference images of demo:mnist; "
        "density/coverage (k=3) needs at least 4 a class: raise --num_reference (0 reads them "
        "all), or drop dc from --metrics")
    assert error(metrics="fid,mem", num_samples=40).endswith(
        "the memorisation check (its 1st percentile) needs at least 100 a class: raise "
        "--num_reference (0 reads them all), or drop mem from --metrics")
    IntraClassEvaluator(with_eval(config, metrics="fid,kid", num_samples=40), None, source)

    def capped(config, source, extractor, count):  # 120 images of each class, 3 features kept
        found, cache, computed = fake_references([120] * 10)(config, source, extractor, count)
        return [dataclasses.replace(r, features=r.features[:3]) for r in found], cache, computed

    monkeypatch.setattr(features, "class_reference_statistics", capped)
    assert error(metrics="fid,pr", num_samples=40) == (
        "class 0 (0) keeps 3 reference features (the 10,000 kept are shared by the 10 "
        "classes); precision/recall (k=3) needs at least 4 a class: drop pr from --metrics")


def test_per_class_lines():
    """FID alone prints as intra-class FID always has; other values join each class's line
    and a line of their means."""
    names = ["zero", "one"]
    assert evaluator_lib.per_class_lines(names, [{"fid": 1.5}, {"fid": 2.25}], 5, [10, 10]) == [
        "class 0 (zero): FID 1.500000", "class 1 (one): FID 2.250000",
        "intra-class FID (mean of 2 classes): 1.875000"]
    scores = [{"kid": 0.01, "kid_std": 0.001, "is": 1.5, "is_std": 0.1, "precision": 0.5,
               "recall": 0.25, "fid": 3.0},
              {"kid": 0.02, "kid_std": 0.003, "is": 2.5, "is_std": 0.2, "precision": 1.0,
               "recall": 0.75, "fid": 4.0}]
    assert evaluator_lib.per_class_lines(names, scores, 5, [8, 10]) == [
        "class 0 (zero): FID 3.000000 KID 0.010000 ± 0.001000 IS 1.500000 ± 0.100000 "
        "precision 0.500000 recall 0.250000",
        "class 1 (one): FID 4.000000 KID 0.020000 ± 0.003000 IS 2.500000 ± 0.200000 "
        "precision 1.000000 recall 0.750000",
        "intra-class FID (mean of 2 classes): 3.500000",
        "per-class mean of 2 classes: KID 0.015000 (5 subsets of 8 to 10 a class) IS 2.000000 "
        "precision 0.750000 recall 0.500000"]
    assert evaluator_lib.per_class_lines(names, [{"precision": 0.5}, {"precision": 0.0}], 5,
                                         [8, 8])[-1] == (
        "per-class mean of 2 classes: precision 0.250000")


@pytest.mark.slow
def test_evaluate_per_class_prints_each_class_and_the_mean(conditional, tmp_path):
    workdir, _, _ = conditional
    out = run(["-m", "dcgan_jax.evaluate", f"--workdir={workdir}", "--per_class",
               "--num_samples=45", "--metrics=fid,kid,pr"]).stdout
    number = r"(\d+\.\d{6})"
    lines = re.findall(rf"^class (\d) \((\w+)\): FID {number} KID {number} ± {number} "
                       rf"precision {number} recall {number}$", out, re.M)
    assert [(int(k), name) for k, name, *_ in lines] == [(k, str(k)) for k in range(10)]
    values = np.array([[float(v) for v in line[2:]] for line in lines])
    mean = float(re.search(r"^intra-class FID \(mean of 10 classes\): ([\d.]+)$", out,
                           re.M).group(1))
    assert mean == pytest.approx(values[:, 0].mean(), abs=2e-6)
    means = re.search(rf"^per-class mean of 10 classes: KID {number} \(5 subsets of 4 a "
                      rf"class\) precision {number} recall {number}$", out, re.M)
    assert [float(v) for v in means.groups()] == pytest.approx(
        values[:, [1, 3, 4]].mean(axis=0), abs=2e-6)
    assert "4 samples of each of 10 classes (40 of the 45 asked for) of G" in out

    too_few = run(["-m", "dcgan_jax.evaluate", f"--workdir={workdir}", "--per_class",
                   "--num_samples=30", "--metrics=fid,pr"], check=False)
    assert too_few.returncode == 1 and too_few.stderr.strip() == (
        "dcgan_jax.evaluate: error: 30 samples give each of the 10 classes 3; "
        "precision/recall (k=3) needs at least 4 a class: give --num_samples=40 or more")

    unconditional = tmp_path / "unconditional"
    unconditional.mkdir()
    (unconditional / "config.json").write_text(config_lib.to_json(tiny_config()))
    result = run(["-m", "dcgan_jax.evaluate", f"--workdir={unconditional}", "--per_class"],
                 check=False)
    assert result.returncode == 1 and result.stderr.strip() == (
        f"dcgan_jax.evaluate: error: --per_class needs a class-conditional run, and "
        f"{unconditional}'s model is unconditional (config.model.num_classes=0); drop "
        f"--per_class")
