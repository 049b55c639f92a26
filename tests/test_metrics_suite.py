"""The metrics beyond FID as a run computes them: each equal to its reference on the very
features the evaluator used, the memorisation check on a G that copies the dataset, the best
checkpoint by any value, statistics keyed by the dataset's content, and bad metric lists."""

import os

import numpy as np
import pytest
from PIL import Image

from dcgan_jax import checkpoints, data, parallel
from dcgan_jax import config as config_lib
from dcgan_jax.evaluation import evaluator as evaluator_lib

from helpers import random_fid_weights, random_image_folder
from test_export import save_run
from tiny_config import tiny_config


def eval_config(tmp_path, **overrides):
    weights = str(tmp_path / "weights.npz")
    if not os.path.exists(weights):
        random_fid_weights(weights)
    return tiny_config(**{"eval__fid_weights": weights, "eval__allow_unknown_weights": True,
                          "eval__num_samples": 24, "eval__num_reference": 30,
                          "eval__batch_size": 12, "eval__kid_subset_size": 12,
                          "eval__kid_subsets": 5, "data__cache_dir": str(tmp_path / "cache"),
                          **overrides})


@pytest.mark.slow
def test_every_metric_equals_its_reference_on_the_evaluators_features(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    prdc = pytest.importorskip("prdc")
    isc = pytest.importorskip("torch_fidelity.metric_isc")
    config = eval_config(tmp_path, eval__dims=2048, eval__metrics="fid,kid,is,pr,dc,mem")
    state = save_run(tmp_path / "run", config)
    source = data.open_source(config.dataset, config.data.cache_dir)
    evaluator = evaluator_lib.Evaluator(config, parallel.make_mesh(), source)
    seen = []
    of_samples = evaluator.extractor.of_samples
    monkeypatch.setattr(evaluator.extractor, "of_samples",
                        lambda *args, **kw: seen.append(of_samples(*args, **kw)) or seen[-1])
    values = evaluator(state)
    (fake,) = seen
    pool, logits = evaluator.extractor.pool(fake), evaluator.extractor.logits(fake)
    assert pool.shape == (24, 2048) and logits.shape == (24, 1008)
    assert sorted(values) == sorted(["fid", "kid", "kid_std", "is", "is_std", "precision",
                                     "recall", "density", "coverage", "memorisation"])
    expected = prdc.compute_prdc(evaluator.reference.features, pool, nearest_k=3)
    for name in ("precision", "recall", "density", "coverage"):
        assert values[name] == pytest.approx(expected[name], abs=1e-6), name
    reference = isc.isc_features_to_metric(torch.from_numpy(logits.astype(np.float64)), 10,
                                           True, 2020)
    assert values["is"] == pytest.approx(reference["inception_score_mean"], abs=1e-6)
    assert values["is_std"] == pytest.approx(reference["inception_score_std"], abs=1e-6)
    # A G that looks its images up in the dataset is flagged; this one draws its own.
    assert values["memorisation"] < 0.2
    copies = evaluator.extractor.of_batches([batch["image"] for batch in data.evaluation_batches(
        config, source, 24, 12)])
    monkeypatch.setattr(evaluator.extractor, "of_samples", lambda *args, **kw: copies)
    assert evaluator(state)["memorisation"] == 1.0


def test_best_metric_ranks_lower_or_higher_values_first():
    fid, precision = checkpoints.ranking("fid"), checkpoints.ranking("precision")
    assert fid({"fid": 10.0}) < fid({"fid": 12.0}) < fid({})
    assert precision({"precision": 0.9}) < precision({"precision": 0.1}) < precision({})


@pytest.mark.parametrize("overrides, message", [
    ({"eval__metrics": "fid,isc"}, "config.eval.metrics='fid,isc': unknown metric 'isc'; "
                                   "give a comma list of fid, kid, is, pr, dc, mem"),
    ({"eval__metrics": "fid,is", "eval__dims": 64}, "config.eval.metrics includes is, whose "
                                                    "logits follow the 2048-d features"),
    ({"eval__metrics": "fid,kid", "eval__best_metric": "precision"},
     "config.eval.best_metric='precision' must be one of the values config.eval.metrics="
     "'fid,kid' gives: fid, kid"),
    ({"eval__metrics": "", "eval__best_metric": "fid"}, "config.eval.metrics='': give a "
                                                        "comma list of"),
])
def test_bad_metric_lists_are_one_line(overrides, message):
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(tiny_config(**overrides))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


@pytest.mark.slow
def test_a_folder_edited_in_place_gets_new_statistics_in_one_line(tmp_path):
    folder = random_image_folder(str(tmp_path / "images"), 12, (32, 32, 3))
    config = eval_config(tmp_path, dataset=f"folder:{folder}", model__channels=3,
                         eval__dims=64, eval__num_reference=0, eval__num_samples=12)
    state = save_run(tmp_path / "run", config)
    mesh = parallel.make_mesh()

    def reference_line():
        source = data.open_source(config.dataset, config.data.cache_dir)
        evaluator = evaluator_lib.Evaluator(config, mesh, source)
        return evaluator.reference_line, evaluator(state)["fid"]

    first, first_fid = reference_line()
    assert "computed in" in first and "changed" not in first
    again, again_fid = reference_line()
    assert "read from" in again and again_fid == first_fid
    image = np.asarray(Image.open(os.path.join(folder, "03.png")))
    Image.fromarray(255 - image).save(os.path.join(folder, "03.png"))  # same count and size
    edited, edited_fid = reference_line()
    assert "the dataset changed since its statistics were cached, so they were computed " \
           "anew" in edited and edited_fid != first_fid
    assert "\n" not in edited


def test_the_evaluations_plot_has_a_panel_per_metric_and_ranks_by_the_best_metric(tmp_path):
    """eval.metrics may change on resume: every metric some evaluation holds gets a panel,
    and the best is config.eval.best_metric's, higher or lower as it ranks."""
    import json

    from dcgan_jax import sample
    config = tiny_config(eval__metrics="fid,kid,pr", eval__best_metric="precision")
    (tmp_path / "config.json").write_text(config_lib.to_json(config))
    rows = [{"step": 2, "fid": 30.0, "kid": 0.1, "kid_std": 0.01, "eval_seconds": 1.0},
            {"step": 4, "fid": 20.0, "precision": 0.8, "recall": 0.3, "eval_seconds": 1.0},
            {"step": 6, "fid": 10.0, "precision": 0.2, "recall": 0.5, "eval_seconds": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    count, best, name = sample.write_fid_plot(str(tmp_path), str(tmp_path / "fid.png"))
    assert (count, best["step"], name) == (3, 4, "precision")
    assert Image.open(tmp_path / "fid.png").size[0] > Image.open(tmp_path / "fid.png").size[1]


@pytest.mark.slow  # Inception passes over 500 images
def test_the_memorisation_check_passes_new_images_of_the_data_and_flags_copies(tmp_path,
                                                                              monkeypatch):
    """What a well-trained demo G should draw, new digits of the dataset's own distribution
    (held-out images, never among the reference), scores about 0.01 (the percentile); a G
    that looks up the reference's own images scores 1."""
    from dcgan_jax.evaluation import quality
    config = eval_config(tmp_path, eval__dims=64, eval__metrics="fid,mem",
                         eval__num_reference=300, eval__num_samples=300, eval__batch_size=100)
    state = save_run(tmp_path / "run", config)
    source = data.open_source(config.dataset, config.data.cache_dir)
    evaluator = evaluator_lib.Evaluator(config, parallel.make_mesh(), source)
    # The evaluation order's first 300 images are the reference; the next 200 are held out.
    batches = data.evaluation_batches(config, source, 500, 100)
    held_out = evaluator.extractor.pool(evaluator.extractor.of_batches(
        batch["image"] for index, batch in enumerate(batches) if index >= 3))
    reference = evaluator.reference.features
    assert reference.shape == (300, 64) and held_out.shape == (200, 64)
    _, threshold = quality.memorisation_fraction(held_out, reference)
    assert threshold > 0, "duplicates in the reference would make the check meaningless"

    monkeypatch.setattr(evaluator.extractor, "of_samples", lambda *args, **kw: held_out)
    assert evaluator(state)["memorisation"] <= 0.03
    copies = reference[np.random.default_rng(0).permutation(300)]
    monkeypatch.setattr(evaluator.extractor, "of_samples", lambda *args, **kw: copies)
    assert evaluator(state)["memorisation"] == 1.0


def test_statistics_file_names_do_not_change_unnoticed():
    """A renamed statistics file makes every run compute its reference again (hours on a
    CPU), without a word: the names are pinned. Bump STATS_VERSION or CLASS_STATS_VERSION
    when what a file holds changes, and update these."""
    import types

    from dcgan_jax.evaluation import features
    config = tiny_config(data__cache_dir="/cache")
    extractor = types.SimpleNamespace(dims=2048, weights_digest="6726825d" * 8)
    fingerprint = "7f842bc7f2db0123456789"
    assert features.reference_cache_path(config, extractor, 5000, 5000, fingerprint) == \
        "/cache/fid_stats/demo_mnist-32px-5000-2048d-ee7a5f9e6299-7f842bc7f2db.npz"
    assert features.reference_cache_path(config, extractor, 5000, 5000, fingerprint,
                                         (3, "three")) == \
        "/cache/fid_stats/demo_mnist-32px-5000-class3-v2-2048d-fe6c60185918-7f842bc7f2db.npz"
