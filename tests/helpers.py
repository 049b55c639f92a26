"""Subprocess runners for multi-device, multi-host and command-line tests."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Shared by the test processes, so a config compiled once loads from disk afterwards.
COMPILATION_CACHE = os.path.join(tempfile.gettempdir(), "dcgan_jax_test_xla_cache")


def subprocess_env(devices: int = 1) -> dict[str, str]:
    """The environment of a test subprocess with `devices` simulated CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = COMPILATION_CACHE
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run(args: list[str], *, devices: int = 1, timeout: float = 300, check: bool = True,
        env: dict[str, str] | None = None, cwd: str = REPO) -> subprocess.CompletedProcess:
    """Runs a Python command line (in the repository root by default) and captures its
    output; `env` adds to the test environment."""
    result = subprocess.run([sys.executable, *args], cwd=cwd,
                            env={**subprocess_env(devices), **(env or {})},
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def main_args(workdir, config_file: str = "tests/tiny_config.py", **overrides) -> list[str]:
    args = ["-m", "dcgan_jax.main", f"--config={config_file}", f"--workdir={workdir}"]
    args += [f"--config.{k}={v}" for k, v in overrides.items()]
    return args


def random_fid_weights(path: str, seed: int = 0) -> str:
    """A .npz in the layout of pytorch-fid's state dict, with random weights and unit
    BatchNorm statistics: enough to exercise every FID code path without the real file. Not
    being pytorch-fid's file, it is read only with config.eval.allow_unknown_weights=True or
    evaluate's --allow_unknown_weights."""
    import jax
    import numpy as np

    from dcgan_jax.evaluation import inception, weights
    rng = np.random.default_rng(seed)
    state_dict = {}
    for tree_path, leaf in jax.tree_util.tree_flatten_with_path(
            inception.abstract_variables(logits=True))[0]:
        names = [p.key for p in tree_path]
        shape = leaf.shape
        if len(shape) == 4:  # Flax HWIO -> torch OIHW
            fan_in = shape[0] * shape[1] * shape[2]
            value = rng.normal(0, (2 / fan_in) ** 0.5, shape).transpose(3, 2, 0, 1)
        elif names[-1] == "kernel":  # the classifier: Flax [in, out] -> torch [out, in]
            value = rng.normal(0, 0.05, shape).T
        elif names[-1] == "var":
            value = np.ones(shape)
        elif names[-1] == "scale":
            value = np.ones(shape)
        else:
            value = rng.normal(0, 0.1, shape)
        state_dict[inception.torch_key(names[1:])] = value.astype(np.float32)
    weights.save_npz(state_dict, path)
    return path


def tree_digest(folder) -> dict[str, str]:
    """SHA-256 of every file under `folder` by relative path, but the run lock (whose text
    names its last holder): equal digests mean a command left every byte of a run as it
    was."""
    import hashlib
    digests = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder)
            if relative != "run.lock":
                with open(path, "rb") as f:
                    digests[relative] = hashlib.sha256(f.read()).hexdigest()
    return digests


def random_image_folder(folder, count: int, shape: tuple[int, ...], suffix: str = ".png"):
    """`count` images of random pixels, named 00.png, 01.png, ...; returns the folder."""
    import numpy as np
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(
            os.path.join(folder, f"{i:02d}{suffix}"))
    return folder


# One colour a class: an image's colour tells which class it is, through any pipeline.
CLASS_COLOURS = ((200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40))


def coloured_class_folder(folder, per_class: int, classes: int = 3, unreadable: bool = True):
    """A folder of class subfolders c0, c1, ... whose images are squares of the class's
    colour (CLASS_COLOURS), of several sizes, some nested one folder deeper; with
    `unreadable`, c1 also holds a truncated PNG. Returns the folder."""
    import numpy as np
    from PIL import Image
    for label in range(classes):
        for i in range(per_class):
            nested = "deeper" if i % 3 == 2 else ""
            path = os.path.join(folder, f"c{label}", nested, f"{i:02d}.png")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            pixels = np.full((36 + i, 40, 3), CLASS_COLOURS[label], np.uint8)
            Image.fromarray(pixels).save(path)
    if unreadable:
        with open(os.path.join(folder, "c0", "00.png"), "rb") as f:
            whole = f.read()
        with open(os.path.join(folder, "c1", "broken.png"), "wb") as f:
            f.write(whole[:60])
    return folder


def colour_classes(images) -> list[int]:
    """The class of each uint8 image [N, H, W, 3] of `coloured_class_folder`, by its mean
    colour; -1 for an image of no class's colour."""
    import numpy as np
    means = np.asarray(images, np.float64).reshape(len(images), -1, 3).mean(axis=1)
    distances = np.abs(means[:, None, :] - np.array(CLASS_COLOURS)[None]).max(axis=-1)
    return [int(d.argmin()) if d.min() <= 3 else -1 for d in distances]


def varied_images(count, height, width, seed):
    """Smooth random images of different brightness and contrast: unlike white noise, their
    Inception features differ from image to image."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (rng.integers(2, 9), rng.integers(2, 9), 3), np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC),
                           np.float32)
        out.append(np.clip(image * rng.uniform(0.3, 1.2) + rng.uniform(-60, 60), 0, 255))
    return np.stack(out).astype(np.uint8)


def write_folder(folder, images):
    """`images` (uint8 [N, H, W(, C)]) as PNGs 0000.png, 0001.png... in a new `folder`."""
    from PIL import Image
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    return str(folder)


def calibrated_fid_weights(folder):
    """pytorch-fid's FID InceptionV3 with torchvision's random initialisation and BatchNorm
    statistics calibrated on a few images (fresh statistics give near-constant features, and
    a saturated classifier: an Inception Score of 1), saved in both of PyTorch's formats in
    `folder`. Returns the state dict and {"zip": path, "legacy": path}. Needs PyTorch and
    pytorch-fid (test-only dependencies)."""
    import numpy as np
    import torch
    from pytorch_fid import inception as pfi
    from torchvision.models.inception import Inception3
    torch.manual_seed(0)
    initial = Inception3(num_classes=1008, aux_logits=False, init_weights=True).state_dict()
    original = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda *args, **kwargs: initial
    try:
        net = pfi.fid_inception_v3()
    finally:
        pfi.load_state_dict_from_url = original
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative averages
    net.train()
    calibration = varied_images(8, 299, 299, seed=100)
    with torch.no_grad():
        for batch in np.split(calibration, 2):
            net(torch.tensor(batch).permute(0, 3, 1, 2).float() / 127.5 - 1)
    state_dict = net.eval().state_dict()
    paths = {"zip": os.path.join(folder, "zip.pth"), "legacy": os.path.join(folder, "legacy.pth")}
    torch.save(state_dict, paths["zip"])
    torch.save(state_dict, paths["legacy"], _use_new_zipfile_serialization=False)
    return state_dict, paths
