"""Every metric of `evaluate --real=DIR --fake=DIR`, end to end on image files, against the
reference implementations run on the same files with the same (random) Inception weights.

What it checks: each printed value (FID; KID and its ±; IS and its ±; precision, recall,
density, coverage) equals, to 1e-4 relative, what the references give on the features of
pytorch-fid's own torch InceptionV3 reading the files as its fid_score does (PIL's RGB,
ToTensor, bilinear resize to 299, 2x - 1): pytorch-fid's calculate_frechet_distance,
torch-fidelity's KID, torch-fidelity's ISC of its `logits_unbiased` (the 2048-d pool features
@ fc.weight.T) and prdc.compute_prdc with k=3. So the file reading, the Flax network, the
logits, the KID subsets, the IS splits and the k-NN balls are all exercised as a user runs them.

What it does not check: torch-fidelity's own feature extractor, which by design prepares pixels
otherwise ((x - 128) / 128 and a TF1-style bilinear resize), so that its features and metrics
differ from pytorch-fid's (ours follow pytorch-fid's); only its metric functions serve as
references here. Nor the real weights file (random weights stand in), nor the memorisation
fraction (no reference implementation). Flax against torch features alone is
test_evaluation's test_inception_matches_pytorch_fid.
"""

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest

from dcgan_jax.evaluation import metrics, quality

from helpers import run, varied_images, write_folder

torch = pytest.importorskip("torch")
pfi = pytest.importorskip("pytorch_fid.inception")
prdc = pytest.importorskip("prdc")
isc = pytest.importorskip("torch_fidelity.metric_isc")
kid = pytest.importorskip("torch_fidelity.metric_kid")

# Image counts: each image costs two 299x299 Inception passes on the CPU. Unequal, so that
# KID's subsets (of the smaller count) differ from one another and its ± is not 0.
REAL, FAKE = 80, 50


def reference_features(monkeypatch, state_dict, folder):
    """2048-d features of a folder's PNG files, as pytorch-fid's fid_score computes them."""
    from pytorch_fid import fid_score
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *args, **kwargs: state_dict)
    net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    # Sorted as fid_score (and evaluate) list them: the order decides KID's subsets and the
    # Inception Score's splits.
    files = sorted(Path(folder).glob("*.png"))
    return fid_score.get_activations(files, net, batch_size=50, dims=2048, device="cpu",
                                     num_workers=0)


def smallest_margin(real, fake, k=quality.NEAREST_K):
    """The smallest |distance / radius - 1| among the comparisons of precision, recall,
    density and coverage: features of two implementations differ by about 1e-5 of the
    distances, so a smaller margin leaves a ball's membership to rounding."""
    from scipy.spatial.distance import cdist
    distances = cdist(real, fake)
    real_radii = np.sort(cdist(real, real), axis=1)[:, k]  # [:, 0] is the point itself
    fake_radii = np.sort(cdist(fake, fake), axis=1)[:, k]
    return min(np.abs(distances / real_radii[:, None] - 1).min(),
               np.abs(distances / fake_radii[None, :] - 1).min())


def reference_values(real, fake, fc_weight):
    """Each metric as its reference computes it, named as `metrics.score` names them."""
    from pytorch_fid import fid_score
    # torch-fidelity's extractor hands its metrics float32 features.
    real32, fake32 = (torch.from_numpy(f.astype(np.float32)) for f in (real, fake))
    kid_values = kid.kid_features_to_metric(
        fake32, real32, kid_subsets=metrics.KID_SUBSETS,
        kid_subset_size=min(metrics.KID_SUBSET_SIZE, len(real), len(fake)),
        rng_seed=metrics.KID_SEED, verbose=False)
    isc_values = isc.isc_features_to_metric(fake32 @ fc_weight.T, quality.ISC_SPLITS, True,
                                            quality.ISC_SEED)
    values = {
        "fid": fid_score.calculate_frechet_distance(real.mean(0), np.cov(real, rowvar=False),
                                                    fake.mean(0), np.cov(fake, rowvar=False)),
        "kid": kid_values[kid.KEY_METRIC_KID_MEAN], "kid_std": kid_values[kid.KEY_METRIC_KID_STD],
        "is": isc_values[isc.KEY_METRIC_ISC_MEAN], "is_std": isc_values[isc.KEY_METRIC_ISC_STD]}
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the counts
        values.update({name: float(value) for name, value in
                       prdc.compute_prdc(real, fake, nearest_k=quality.NEAREST_K).items()})
    return values


def printed_values(output):
    """The values of `evaluate`'s lines (print_scores), named as `metrics.score` names them."""
    number, values = r"(-?\d+\.\d+)", {}
    for name, label in (("fid", "FID"), ("kid", "KID"), ("is", "IS")):
        match = re.search(rf"^{label}: {number}(?: ± {number})?", output, re.MULTILINE)
        values[name] = float(match.group(1))
        if match.group(2) is not None:
            values[f"{name}_std"] = float(match.group(2))
    for name in ("precision", "recall", "density", "coverage"):
        values[name] = float(re.search(rf"^{name}: {number}$", output, re.MULTILINE).group(1))
    return values


@pytest.mark.slow
def test_every_metric_of_the_command_line_matches_its_reference(torch_weights, tmp_path,
                                                                 monkeypatch):
    state_dict, paths = torch_weights
    # Half the fakes as the reals are drawn, half with shifted blue: precision and recall
    # between 0 and 1. No copies of reals: a copy is as far from each real as its original,
    # which is some real's k-th neighbour, so such distances equal radii and rounding decides.
    # The seeds leave every comparison 3e-4 or more from a tie (smallest_margin).
    real = write_folder(tmp_path / "real", varied_images(REAL, 32, 32, seed=11))
    fakes = varied_images(FAKE, 32, 32, seed=17)
    fakes[FAKE // 2:, :, :, 2] = fakes[FAKE // 2:, :, :, 2] // 2 + 100
    fake = write_folder(tmp_path / "fake", fakes)

    # 10 images a batch divides both counts: one shape, one compilation.
    output = run(["-m", "dcgan_jax.evaluate", f"--real={real}", f"--fake={fake}",
                  "--metrics=fid,kid,is,pr,dc", f"--fid_weights={paths['zip']}",
                  "--allow_unknown_weights", "--batch_size=10"]).stdout
    got = printed_values(output)
    size = min(metrics.KID_SUBSET_SIZE, REAL, FAKE)
    assert f"({metrics.KID_SUBSETS} subsets of {size})" in output

    real_features = reference_features(monkeypatch, state_dict, real)
    fake_features = reference_features(monkeypatch, state_dict, fake)
    expected = reference_values(real_features, fake_features, state_dict["fc.weight"])
    assert sorted(got) == sorted(expected)
    # Else the k-NN values would mean little, or be decided by rounding.
    for name in ("precision", "recall", "coverage"):
        assert 0 < expected[name] < 1, (name, expected[name])
    assert smallest_margin(real_features, fake_features) > 1e-4
    for name, value in expected.items():
        # 6 decimals are printed: abs=1e-6 absorbs their rounding (5e-7), which exceeds 1e-4
        # relative for a value below 5e-3 (none here, but a KID of real weights can be).
        assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, got, expected)
