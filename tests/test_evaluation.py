"""FID and KID: the network, the weights files, the metrics and the command line against
pytorch-fid and torch-fidelity (test-only dependencies), with shared random weights."""

import functools
import os
import re
import types

import numpy as np
import pytest

from dcgan_jax import parallel
from dcgan_jax.evaluation import features, metrics, weights

from helpers import random_fid_weights, run, varied_images, write_folder

torch = pytest.importorskip("torch")
pfi = pytest.importorskip("pytorch_fid.inception")


def pytorch_fid_features(state_dict, images, dims):
    original = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda *args, **kwargs: state_dict
    try:
        net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[dims]]).eval()
    finally:
        pfi.load_state_dict_from_url = original
    with torch.no_grad():
        out = net(torch.tensor(images).permute(0, 3, 1, 2).float() / 255)[0]
    return out.mean(dim=(2, 3)).numpy()


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_weights_reader_matches_torch_load(torch_weights, fmt):
    state_dict, paths = torch_weights
    ours = weights.read_state_dict(paths[fmt])
    assert set(ours) == set(state_dict)
    for key, value in state_dict.items():
        np.testing.assert_array_equal(ours[key], value.numpy(), err_msg=key)


@pytest.mark.parametrize("dims,sizes", [
    # The whole network at three sizes: the slow tier (the others keep it in the fast one).
    pytest.param(2048, [(64, 64), (299, 299), (37, 53)], marks=pytest.mark.slow),
    (768, [(128, 128)]),
    (192, [(32, 32)]),
    (64, [(320, 240)]),
])
def test_inception_matches_pytorch_fid(torch_weights, dims, sizes):
    state_dict, paths = torch_weights
    extractor = features.FeatureExtractor(paths["zip"], dims, parallel.make_mesh(), 4)
    for i, (height, width) in enumerate(sizes):
        images = varied_images(4, height, width, seed=i)
        expected = pytorch_fid_features(state_dict, images, dims)
        got = extractor.of_images(images)
        assert got.shape == (4, dims)
        spread = np.abs(expected - expected.mean(0)).max() / np.abs(expected).max()
        assert spread > 0.05, "features barely differ between images: the test is vacuous"
        error = np.abs(got - expected).max() / np.abs(expected).max()
        assert error < 1e-4, (height, width, error)


def pytorch_fid_distance(monkeypatch, args, fail_first=False):
    """pytorch-fid's distance, and how many times it called `sqrtm` (2: it retried with 1e-6 on
    the diagonals). With `fail_first`, its first `sqrtm` returns NaNs, as scipy's does on some
    hosts for a singular product, so that its retry runs on every host."""
    from pytorch_fid import fid_score
    from scipy import linalg
    calls = []

    def sqrtm(matrix, disp=True):
        calls.append(matrix)
        failed = fail_first and len(calls) == 1
        root = np.full_like(matrix, np.nan) if failed else linalg.sqrtm(matrix)
        return root if disp else (root, None)

    monkeypatch.setattr(fid_score, "linalg", types.SimpleNamespace(sqrtm=sqrtm))
    return fid_score.calculate_frechet_distance(*args), len(calls)


def gaussian_statistics(count1, count2, dims, seed):
    """Statistics of two different, correlated Gaussian samples."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(count1, dims)) * rng.uniform(0.1, 3, dims)
    b = rng.normal(0.2, 1.3, size=(count2, dims)) @ rng.normal(size=(dims, dims)) / dims**0.5
    return a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)


@pytest.mark.parametrize("count1,count2,dims", [(40, 50, 16), (300, 400, 64)])
def test_frechet_distance_matches_pytorch_fid(monkeypatch, count1, count2, dims):
    args = gaussian_statistics(count1, count2, dims, seed=0)
    expected, calls = pytorch_fid_distance(monkeypatch, args)
    assert calls == 1
    assert metrics.frechet_distance(*args) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("count1,count2,dims", [(30, 30, 64), (10, 12, 64), (50, 60, 100)])
def test_frechet_distance_near_singular_matches_pytorch_fid(monkeypatch, count1, count2, dims):
    """Fewer images than dimensions (as 1,000 images of 2,048-d features): singular
    covariances, whose product's square root pytorch-fid takes with `sqrtm` all the same."""
    args = gaussian_statistics(count1, count2, dims, seed=1)
    expected, calls = pytorch_fid_distance(monkeypatch, args)
    # Assumes scipy's sqrtm of this product of random singular covariances is finite, so that
    # pytorch-fid adds no offset (which would move its FID by up to 6e-5 here): the zero
    # eigenvalues of the product come out as rounding noise, not exact zeros; and the trace of
    # a Schur-form square root depends on the eigenvalues only, so finite garbage elsewhere in
    # it (as on AVX-512 hosts) cannot matter.
    assert calls == 1
    assert metrics.frechet_distance(*args) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("v", [[1., 1, 0, -1, 1], [-1., 0, 2, 1, 0]])
def test_frechet_distance_of_rank_one_covariances(monkeypatch, v):
    """u u^T v v^T = (u.v) u v^T has eigenvalues (u.v)^2 and 0, so Tr sqrt(S1 S2) = |u.v|."""
    u, v = np.array([1., 1, -1, 0, 1]), np.array(v)
    singular = (np.zeros(5), np.outer(u, u), np.ones(5), np.outer(v, v))
    closed_form = 5 + u @ u + v @ v - 2 * abs(u @ v)
    got = metrics.frechet_distance(*singular)
    assert got == pytest.approx(closed_form, rel=1e-12)
    # scipy's sqrtm of this product is non-finite on some hosts (AVX2) and finite garbage with
    # the right trace on others (AVX-512), so pytorch-fid's retry with 1e-6 added to both
    # diagonals is forced. Assumes only that sqrtm of that offset product (eigenvalues 1e-12
    # and up) is accurate; the offset itself moves pytorch-fid's value by 1.6e-6 relative.
    expected, calls = pytorch_fid_distance(monkeypatch, singular, fail_first=True)
    assert calls == 2
    assert got == pytest.approx(expected, rel=1e-5)


def test_frechet_distance_errors():
    indefinite = np.diag([1., -0.5, 2])
    for sigma1, sigma2 in [(indefinite, np.eye(3)), (np.eye(3), indefinite)]:
        with pytest.raises(metrics.MetricError, match="not positive semi-definite"):
            metrics.frechet_distance(np.zeros(3), sigma1, np.zeros(3), sigma2)
    with pytest.raises(metrics.MetricError, match="same --dims"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_kid_matches_torch_fidelity():
    from torch_fidelity.metric_kid import (
        KEY_METRIC_KID_MEAN,
        KEY_METRIC_KID_STD,
        kid_features_to_metric,
    )
    rng = np.random.default_rng(1)
    fake = rng.normal(size=(300, 32)).astype(np.float32)
    real = rng.normal(0.5, 1.2, size=(250, 32)).astype(np.float32)
    expected = kid_features_to_metric(torch.tensor(fake), torch.tensor(real), kid_subsets=20,
                                      kid_subset_size=100, rng_seed=metrics.KID_SEED,
                                      verbose=False)
    mean, std = metrics.kid(fake, real, subsets=20, subset_size=100)
    assert mean == pytest.approx(expected[KEY_METRIC_KID_MEAN], rel=1e-4)
    assert std == pytest.approx(expected[KEY_METRIC_KID_STD], rel=1e-3)
    assert mean > 5 * std  # the two sets differ


def fid_of(output):
    return float(re.search(r"FID:\s+([-\d.e]+)", output).group(1))


@pytest.mark.slow
def test_command_line_matches_pytorch_fid(torch_weights, tmp_path):
    """Folders in, FID out, both ways round, and each tool reading the other's statistics."""
    _, paths = torch_weights
    # 64-d features keep it fast; 80 images keep their covariance non-singular.
    real = write_folder(tmp_path / "real", varied_images(80, 48, 48, seed=7))
    fake_images = varied_images(80, 48, 48, seed=8)
    fake_images[:, :, :, 0] //= 2  # a different distribution
    fake = write_folder(tmp_path / "fake", fake_images)
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    os.symlink(paths["zip"], hub / f"{weights.WEIGHTS_NAME}.pth")
    env = {"TORCH_HOME": str(tmp_path / "torch_home")}
    theirs_args = ["--device", "cpu", "--dims", "64", "--num-workers", "0"]

    theirs = fid_of(run(["-m", "pytorch_fid", real, fake, *theirs_args], env=env).stdout)
    ours = run(["-m", "dcgan_jax.evaluate", f"--real={real}", f"--fake={fake}",
                f"--fid_weights={paths['zip']}", "--allow_unknown_weights", "--dims=64",
                "--batch_size=50"]).stdout
    assert theirs > 1.0
    assert fid_of(ours) == pytest.approx(theirs, rel=1e-3)
    assert re.search(r"KID: [-\d.]+ ± [\d.]+ \(100 subsets of 80\)", ours)

    their_stats, our_stats = str(tmp_path / "theirs.npz"), str(tmp_path / "ours.npz")
    run(["-m", "pytorch_fid", "--save-stats", real, their_stats, *theirs_args], env=env)
    run(["-m", "dcgan_jax.evaluate", f"--real={real}", f"--save_stats={our_stats}",
         f"--fid_weights={paths['legacy']}", "--allow_unknown_weights", "--dims=64"],
        devices=4)
    # Statistics of the same folder, one file from each tool, read by each tool.
    they_read_both = fid_of(run(["-m", "pytorch_fid", our_stats, their_stats, *theirs_args],
                                env=env).stdout)
    we_read_both = fid_of(run(["-m", "dcgan_jax.evaluate", f"--real={their_stats}",
                               f"--fake={our_stats}"]).stdout)
    for same in (they_read_both, we_read_both):
        assert same == pytest.approx(0.0, abs=1e-3 * theirs)


def test_weights_fetched_once_from_a_mirror(torch_weights, tmp_path, monkeypatch):
    """The fetch, check and conversion, with the random weights standing in for the real
    ones (tests/test_weights.py shows that a mirror's other file is refused)."""
    import http.server
    import threading
    _, paths = torch_weights
    monkeypatch.setattr(weights, "WEIGHTS_SHA256", weights.file_digest(paths["legacy"]))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                directory=os.path.dirname(paths["legacy"]))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv(weights.URL_VARIABLE,
                           f"http://127.0.0.1:{server.server_address[1]}/legacy.pth")
        cache = str(tmp_path / "cache")
        path = weights.locate("", cache)
        assert path == os.path.join(cache, weights.WEIGHTS_NAME + ".npz")
        assert sorted(os.listdir(cache)) == [weights.WEIGHTS_NAME + ".npz"]
        server.shutdown()  # a second call must not fetch
        assert weights.locate("", cache) == path
    finally:
        server.server_close()
    converted = weights.read_state_dict(path)
    np.testing.assert_array_equal(converted["fc.weight"],
                                  weights.read_state_dict(paths["zip"])["fc.weight"])


def one_line_error(result, *needles):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.slow
def test_one_line_errors(tmp_path):
    real = write_folder(tmp_path / "real", varied_images(3, 16, 16, seed=0))
    good = random_fid_weights(str(tmp_path / "good.npz"))
    args = ["-m", "dcgan_jax.evaluate", f"--real={real}", f"--fake={real}"]

    offline = run(args, check=False, env={
        "HOME": str(tmp_path), weights.URL_VARIABLE: "http://127.0.0.1:9/pt_inception.pth"})
    one_line_error(offline, "cannot be fetched from http://127.0.0.1:9/", "--fid_weights=PATH",
                   str(tmp_path / ".cache" / "dcgan_jax" / "weights"))
    assert not (tmp_path / ".cache").exists()  # no empty cache folder left behind
    missing = run(args + [f"--fid_weights={tmp_path / 'nope.pth'}"], check=False)
    one_line_error(missing, "nope.pth", "does not exist")
    one_line_error(run(["-m", "dcgan_jax.evaluate", f"--workdir={tmp_path / 'nowhere'}"],
                       check=False), "nowhere/config.json does not exist")

    # Weights that are not pytorch-fid's: refused unless allowed, before anything is read.
    unknown = one_line_error(run(args + [f"--fid_weights={good}"], check=False), good,
                             "SHA-256 ", "--allow_unknown_weights")
    assert weights.file_digest(good)[:16] in unknown
    args.append("--allow_unknown_weights")

    state_dict = weights.read_state_dict(good)
    state_dict["Mixed_5b.branch1x1.conv.weight"] = np.zeros((64, 192, 3, 3), np.float32)
    wrong = str(tmp_path / "wrong.npz")
    weights.save_npz(state_dict, wrong)
    one_line_error(run(args + [f"--fid_weights={wrong}"], check=False),
                   "'Mixed_5b.branch1x1.conv.weight' has shape (64, 192, 3, 3)", "(64, 192, 1, 1)")

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    one_line_error(run(args + [f"--fid_weights={truncated}"], check=False), "truncated.pth",
                   "cannot be read")

    single = write_folder(tmp_path / "single", varied_images(1, 16, 16, seed=0))
    one_line_error(run(["-m", "dcgan_jax.evaluate", f"--real={single}", f"--fake={real}",
                        f"--fid_weights={good}", "--allow_unknown_weights", "--dims=64"],
                       check=False),
                   "holds 1 image file(s); FID needs at least 2")
    with pytest.raises(metrics.MetricError, match="at least 2 images"):
        metrics.Statistics.of(np.zeros((1, 64)))
