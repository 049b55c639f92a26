"""A run whose workdir is a bucket, as on a TPU pod: a GCS emulator on 127.0.0.1, started
here (tests/gcs_emulator.py), stands for Cloud Storage.

epath reaches the emulator through gcsfs (EPATH_USE_TF=false: TensorFlow's own GCS client
always calls www.googleapis.com) and orbax's arrays through tensorstore
(TENSORSTORE_GCS_HTTP_URL); both go without credentials.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import portpicker
import pytest

from helpers import REPO, main_args, random_fid_weights, run

pytest.importorskip("gcp_storage_emulator")
pytest.importorskip("gcsfs")
pytestmark = pytest.mark.slow

BUCKET = "runs"


@pytest.fixture
def emulator():
    """The emulator's URL and the environment that points every library at it."""
    port = portpicker.pick_unused_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "gcs_emulator.py"),
                               str(port), BUCKET],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "no emulator"
                time.sleep(0.2)
        yield url, {
            "EPATH_USE_TF": "false",
            "STORAGE_EMULATOR_HOST": url,
            "FSSPEC_GCS_TOKEN": "anon",
            # gcsfs asks a gRPC API, which the emulator lacks, what kind each bucket is.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "TENSORSTORE_GCS_HTTP_URL": url,
        }
    finally:
        server.terminate()
        server.wait(timeout=10)


def objects(url: str) -> list[str]:
    with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o") as reply:
        return sorted(item["name"] for item in json.load(reply).get("items", []))


def upload(url: str, name: str, data: bytes) -> None:
    urllib.request.urlopen(urllib.request.Request(
        f"{url}/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name={name}", data=data,
        method="POST")).close()


def download(url: str, name: str) -> bytes:
    with urllib.request.urlopen(f"{url}/download/storage/v1/b/{BUCKET}/o/"
                                f"{urllib.parse.quote(name, safe='')}?alt=media") as reply:
        return reply.read()


def test_train_resume_sample_and_evaluate_in_a_bucket(emulator, tmp_path):
    url, env = emulator
    env["HOME"] = str(tmp_path)  # prepared data stays local, under ~/.cache/dcgan_jax
    workdir, cache = f"gs://{BUCKET}/run", f"gs://{BUCKET}/cache"
    first = run(main_args(workdir, **{"data.cache_dir": cache}), env=env).stdout
    assert "is in a bucket, which has no locks" in first
    assert (f"config.data.cache_dir={cache} is a bucket: prepared data, memory-mapped, "
            f"stays on this host's disk under {tmp_path}/.cache/dcgan_jax") in first
    second = run(main_args(workdir, **{"data.cache_dir": cache, "train.num_steps": 9}),
                 env=env).stdout
    assert f"Resumed from step 6 in {workdir}/checkpoints" in second
    grid = run(["-m", "dcgan_jax.sample", "grid", f"--workdir={workdir}", "--rows=2",
                "--cols=2"], env=env).stdout.strip()
    assert grid == f"{workdir}/figures/grid_step9_seed0.png"
    plot = run(["-m", "dcgan_jax.sample", "plot", f"--workdir={workdir}"], env=env).stdout
    assert "5 logged steps" in plot  # steps 2, 4 and 6, then 8 and 9 after the resume

    # FID weights read from the bucket, reference statistics cached in it.
    upload(url, "weights.npz", pathlib.Path(random_fid_weights(str(tmp_path / "w.npz"))
                                            ).read_bytes())
    scores = run(["-m", "dcgan_jax.evaluate", f"--workdir={workdir}", "--dims=64",
                  f"--fid_weights=gs://{BUCKET}/weights.npz", "--allow_unknown_weights",
                  "--num_samples=32", "--num_reference=64", "--batch_size=32"],
                 env=env).stdout
    assert re.search(rf"computed in [\d.]+ s and cached in {cache}/fid_stats/.*\.npz", scores)
    assert re.search(r"FID: [\d.]+", scores)

    names = objects(url)
    assert {"run/config.json", "run/metrics.jsonl", "run/samples/real.png",
            "run/samples/step_0000003.png", "run/samples/step_0000009.png",
            "run/figures/grid_step9_seed0.png", "run/figures/losses.png"} <= set(names)
    assert {int(m.group(1)) for n in names if (m := re.match(r"run/checkpoints/(\d+)/", n))
            } == {3, 6, 9}
    assert len([n for n in names if "events.out.tfevents" in n]) == 2  # one per run
    assert len([n for n in names if n.startswith("cache/fid_stats/")]) == 1
    assert not any(n.endswith((".tmp", "run.lock")) or "prepared" in n for n in names)
    lines = download(url, "run/metrics.jsonl").decode().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4, 6, 8, 9]
