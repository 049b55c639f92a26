"""FID during training: logged, plotted, the best checkpoint kept, and the same number from
`evaluate --workdir` and from the files `sample files` writes."""

import json
import os
import re

import pytest

from helpers import main_args, random_fid_weights, run

pytestmark = pytest.mark.slow  # every test runs command lines as processes


def eval_overrides(tmp_path, weights_path):
    return {"eval.every": 2, "eval.num_samples": 64, "eval.num_reference": 200,
            "eval.dims": 64, "eval.batch_size": 32, "eval.kid_subsets": 10,
            "eval.kid_subset_size": 32, "eval.fid_weights": weights_path,
            "eval.allow_unknown_weights": True,
            "data.cache_dir": str(tmp_path / "cache"), "keep_checkpoints": 1,
            "ckpt_every": 100}


def test_fid_during_training_keeps_the_best_checkpoint(tmp_path):
    weights_path = random_fid_weights(str(tmp_path / "weights.npz"))
    workdir = tmp_path / "run"
    overrides = eval_overrides(tmp_path, weights_path)
    first = run(main_args(workdir, **overrides, **{"train.num_steps": 8})).stdout
    assert re.search(r"FID reference: 200 images of demo:mnist, 64-d features, computed in "
                     r"[\d.]+ s and cached in .*fid_stats/.*\.npz", first)
    evaluations = re.findall(r"step (\d+) \| FID ([\d.]+) KID [-\d.]+ ± [\d.]+ \(64 samples "
                             r"of G vs 200 dataset images", first)
    assert [int(s) for s, _ in evaluations] == [2, 4, 6, 8]

    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in rows if "fid" in r}
    assert sorted(logged) == [2, 4, 6, 8]
    assert all(r["fid"] > 0 and "kid" in r and r["kid_std"] >= 0 for r in logged.values())
    best = min(logged, key=lambda s: logged[s]["fid"])
    kept = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert kept == sorted({best, 8})  # the latest one, and the best one
    assert f"Best FID {logged[best]['fid']:.3f} at step {best}" in first

    # A resumed run reads the cached reference and still knows (and keeps) the best.
    second = run(main_args(workdir, **overrides, **{"train.num_steps": 10})).stdout
    assert "read from" in second and "computed in" not in second
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in rows if "fid" in r}
    assert sorted(logged) == [2, 4, 6, 8, 10]
    best = min(logged, key=lambda s: logged[s]["fid"])
    kept = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert kept == sorted({best, 10})

    # On demand, the best checkpoint scores what training logged for it.
    again = run(["-m", "dcgan_jax.evaluate", f"--workdir={workdir}", f"--step={best}"]).stdout
    fid = float(re.search(r"FID: ([\d.]+)", again).group(1))
    assert fid == pytest.approx(logged[best]["fid"], rel=1e-5)

    # So do the PNG files of `sample files`, against the cached reference statistics.
    files = tmp_path / "files"
    run(["-m", "dcgan_jax.sample", "files", f"--workdir={workdir}", f"--step={best}",
         "--num=64", f"--out={files}"])
    stats = next((tmp_path / "cache" / "fid_stats").iterdir())
    from_files = run(["-m", "dcgan_jax.evaluate", f"--real={stats}", f"--fake={files}",
                      f"--fid_weights={weights_path}", "--allow_unknown_weights",
                      "--dims=64"], devices=2).stdout
    assert float(re.search(r"FID: ([\d.]+)", from_files).group(1)) == pytest.approx(
        logged[best]["fid"], rel=1e-4)

    plot = run(["-m", "dcgan_jax.sample", "fid", f"--workdir={workdir}"]).stdout
    assert f"5 evaluations; best FID {logged[best]['fid']:.3f} at step {best}" in plot
    assert (workdir / "figures" / "fid.png").stat().st_size > 10_000


def test_training_stops_early_without_weights(tmp_path):
    result = run(main_args(tmp_path / "run", **{"eval.every": 2, "data.cache_dir": str(
        tmp_path / "cache")}), check=False,
        env={"DCGAN_JAX_FID_WEIGHTS_URL": "http://127.0.0.1:9/pt_inception.pth"})
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("dcgan_jax: error: the FID weights are not in ")
    assert "config.eval.fid_weights" in last
    assert not (tmp_path / "run" / "checkpoints").exists() or not os.listdir(
        tmp_path / "run" / "checkpoints")
