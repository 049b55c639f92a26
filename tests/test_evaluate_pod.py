"""`python -m dcgan_jax.evaluate` on two hosts of a pod: the scores of one process, printed by
process 0 alone.

Two processes on 127.0.0.1 with gloo collectives, a CPU device each, stand for two hosts; one
process with two devices is the same mesh on one host.
"""

import json
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import portpicker
import pytest
from PIL import Image

from dcgan_jax import checkpoints, parallel
from dcgan_jax import config as config_lib
from dcgan_jax import step as step_lib

from helpers import REPO, random_fid_weights, subprocess_env
from tiny_config import tiny_config

pytestmark = pytest.mark.slow

METRICS = "fid,kid,is,pr,dc,mem"  # is: 2048-d features, so few images keep it fast
# Every line of print_scores: its name, its value and the spread after ±, if any.
SCORE = re.compile(r"^(FID|KID|IS|precision|recall|density|coverage|memorisation): "
                   r"(-?[\d.]+)(?: ± ([\d.]+))?", re.MULTILINE)
OTHER_LINES = ("FID reference:", " samples of ")


def save_diverse_run(root) -> str:
    """A workdir of a fresh tiny G whose BatchNorm statistics are its own batches' and whose
    last layer is scaled up, so that its samples differ from each other (a fresh G's are
    all mid-grey), and whose dataset is a folder of 40 other samples of it: scores against
    the same distribution, all of them away from their extremes (an IS of 1, a precision
    of 0). No training: seconds."""
    folder = root / "images"
    folder.mkdir()
    config = tiny_config(
        dataset=f"folder:{folder}", eval__fid_weights=random_fid_weights(
            str(root / "weights.npz")), eval__allow_unknown_weights=True, eval__dims=2048,
        eval__num_samples=10, eval__num_reference=40, eval__batch_size=20,
        eval__kid_subsets=5, eval__kid_subset_size=20, eval__metrics="fid",
        data__cache_dir=str(root / "cache"))
    state = step_lib.create_train_state(config, parallel.make_mesh(), total_steps=1)
    generator, _ = step_lib.build_models(config, dtype=jnp.float32)
    params, stats = state.g.params, state.g.batch_stats
    z = jax.random.normal(jax.random.PRNGKey(1), (256, config.model.nz))
    update = jax.jit(lambda stats: generator.apply(
        {"params": params, "batch_stats": stats}, z, None, train=True,
        mutable=["batch_stats"])[1]["batch_stats"])
    for _ in range(60):  # running averages of momentum 0.9: converged
        stats = update(stats)
    last = max(name for name in params if name.startswith("ConvTranspose"))
    params = {**params, last: jax.tree.map(lambda x: x * 10, params[last])}
    images = generator.apply({"params": params, "batch_stats": stats}, z[:40], None,
                             train=False)[0]
    pixels = np.asarray(jnp.clip(jnp.rint((images + 1) * 127.5), 0, 255)).astype(np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image[..., 0], "L").save(folder / f"{i:03d}.png")
    workdir = root / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(config_lib.to_json(config))
    manager = checkpoints.make_manager(str(workdir))
    checkpoints.save(manager, 0, state.replace(g=state.g.replace(params=params,
                                                                 batch_stats=stats)),
                     dataset={"dataset": config.dataset})
    checkpoints.finish_saves(manager)
    return str(workdir)


def start(args: list[str], devices: int) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=REPO, env=subprocess_env(devices), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[str]:
    """The stdout of each of `procs`, all of which must succeed."""
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:  # one that failed leaves the other waiting in a collective
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outputs]


def scores(stdout: str) -> dict[str, tuple[float, ...]]:
    return {name: tuple(float(x) for x in values if x)
            for name, *values in SCORE.findall(stdout)}


def test_scores_on_two_hosts_equal_one_process_and_process_0_alone_prints(tmp_path):
    workdir = save_diverse_run(tmp_path)
    # The same run scored by one process, with reference statistics of its own.
    alone = tmp_path / "alone"
    shutil.copytree(workdir, alone)
    config = json.loads((alone / "config.json").read_text())
    config["data"]["cache_dir"] = str(tmp_path / "cache_alone")
    (alone / "config.json").write_text(json.dumps(config))
    args = [sys.executable, "-m", "dcgan_jax.evaluate", "--num_samples=20",
            f"--metrics={METRICS}"]
    port = portpicker.pick_unused_port()
    # All three at once: each process spends much of its time compiling on one core.
    first, second, single = finish([
        *[start([*args, f"--workdir={workdir}", "--num_processes=2", f"--process_id={i}",
                 f"--coordinator_address=127.0.0.1:{port}"], devices=1) for i in range(2)],
        start([*args, f"--workdir={alone}"], devices=2)])

    expected = scores(single)
    assert sorted(expected) == sorted(["FID", "KID", "IS", "precision", "recall", "density",
                                       "coverage", "memorisation"]), single
    assert 1 < expected["IS"][0] and 0 < expected["coverage"][0] < 1, single
    pod = scores(first)
    assert sorted(pod) == sorted(expected), first
    for name, values in expected.items():
        assert pod[name] == pytest.approx(values, rel=1e-5, abs=1e-6), (name, first, single)
    for line in OTHER_LINES:
        assert line in first and line in single, (line, first)
    assert "20 samples of G vs 40 dataset images" in first, first
    assert not SCORE.search(second) and not any(line in second for line in OTHER_LINES), (
        "process 0 alone prints", second)
    # Both hosts computed the reference statistics; process 0 alone wrote them, whole.
    cached = sorted(p.name for p in (tmp_path / "cache" / "fid_stats").iterdir())
    assert len(cached) == 1 and cached[0].endswith(".npz"), cached
