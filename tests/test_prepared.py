"""Prepared data: decoded once, equal to the decode path, rebuilt when stale or broken."""

import errno
import os
import socket
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dcgan_jax import data, prepared
from dcgan_jax import step as step_lib

from tiny_config import tiny_config


@pytest.fixture
def folder_config(tmp_path):
    """Colour JPEGs and PNGs of several sizes, one truncated file; a private cache."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    root.mkdir()
    for i in range(20):
        pixels = rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img{i:02d}.{'jpg' if i % 3 else 'png'}")
    (root / "img99_truncated.png").write_bytes((root / "img00.png").read_bytes()[:150])
    return tiny_config(dataset=f"folder:{root}", model__channels=3, train__batch_size=4,
                       data__cache_dir=str(tmp_path / "cache"))


def prepare(config, lines=None, shard=None, workers=0):
    source = data.open_source(config.dataset)
    return data.prepare_shard(config, source, shard or prepared.Shard(),
                              say=(lines.append if lines is not None else lambda line: None),
                              workers=workers)


@pytest.mark.parametrize("workers", [0, 2])
def test_prepared_images_equal_the_decode_path(folder_config, workers):
    lines = []
    images = prepare(folder_config, lines, workers=workers)
    source = data.open_source(folder_config.dataset)
    readable = [r["image"] for r in source if "truncated" not in r["image"]]
    assert images.images.shape == (len(readable), 32, 32, 3) and images.labels is None
    for row, path in zip(images.images, readable, strict=True):
        np.testing.assert_array_equal(row, data.preprocess(path, 32, 3, "center"))
    assert images.meta["unreadable_count"] == 1
    assert images.meta["unreadable"] == [source[-1]["image"]]
    assert "1 unreadable image file(s) were left out" in images.unreadable_message
    assert lines[0].startswith("Preparing 21 records into ") and "not prepared yet" in lines[0]
    again = []
    prepare(folder_config, again)
    assert again == [], "a complete, current folder is reused silently"


def test_shards_split_the_source(folder_config):
    source = data.open_source(folder_config.dataset)
    first = prepare(folder_config, shard=prepared.Shard(0, 2))
    second = prepare(folder_config, shard=prepared.Shard(1, 2))
    assert first.path != second.path and "shard0of2" in first.path
    assert len(first.images) + len(second.images) == len(source) - 1
    np.testing.assert_array_equal(second.images[0],
                                  data.preprocess(source[1]["image"], 32, 3, "center"))


def test_a_changed_folder_is_prepared_again(folder_config):
    before = prepare(folder_config)
    folder = folder_config.dataset.removeprefix("folder:")
    Image.fromarray(np.full((30, 30, 3), 7, np.uint8)).save(os.path.join(folder, "new.png"))
    lines = []
    after = prepare(folder_config, lines)
    assert len(lines) == 2 and "the source changed: 21 records when prepared, 22 now" in lines[0]
    assert after.path == before.path and len(after.images) == len(before.images) + 1
    os.utime(os.path.join(folder, "new.png"), ns=(1, 1))
    lines = []
    prepare(folder_config, lines)
    assert "files were modified since it was prepared" in lines[0]


def test_a_truncated_images_file_is_never_read_and_is_rebuilt(folder_config):
    images = prepare(folder_config)
    path = os.path.join(images.path, prepared.IMAGES_FILE)
    expected = open(path, "rb").read()
    with open(path, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(prepared.PreparedDataError, match="holds 1,000 bytes, not the .* "
                                                         "truncated"):
        prepared.open_prepared(images.path)
    lines = []
    rebuilt = prepare(folder_config, lines)
    assert "it is truncated" in lines[0] and "\n" not in lines[0]
    assert open(os.path.join(rebuilt.path, prepared.IMAGES_FILE), "rb").read() == expected


def test_an_interrupted_or_disk_full_preparation_leaves_nothing(folder_config, tmp_path):
    config = folder_config
    target = data.prepared_folder(config, data.open_source(config.dataset), prepared.Shard())

    def chunks_then(error):
        def decode(records):
            yield prepared.Chunk(np.zeros((2, 32, 32, 3), np.uint8), None, [])
            raise error
        return decode

    for error, expected in [(OSError(errno.ENOSPC, "No space left on device"),
                             prepared.PreparedDataError), (KeyboardInterrupt(),
                                                           KeyboardInterrupt)]:
        with pytest.raises(expected) as raised:
            prepared.find_or_prepare(target, list(range(21)), "fingerprint",
                                     chunks_then(error), {"source_count": 21}, (32, 32, 3),
                                     say=lambda line: None)
        assert os.listdir(os.path.dirname(target)) == [], type(raised.value).__name__
    with pytest.raises(prepared.PreparedDataError) as full:
        prepared.find_or_prepare(target, list(range(21)), "fingerprint",
                                 chunks_then(OSError(errno.ENOSPC, "No space")),
                                 {"source_count": 21}, (32, 32, 3), say=lambda line: None)
    text = str(full.value)
    assert "the disk is full" in text and "config.data.cache_dir" in text and "\n" not in text


def test_batches_cover_each_epoch_once_and_resume_exactly():
    images = np.arange(22, dtype=np.uint8).reshape(22, 1, 1, 1)
    iterator = prepared.BatchIterator(images, batch_size=4, seed=3, chunks=2)
    epoch = np.concatenate([next(iterator)["image"].ravel() for _ in range(5)])
    assert len(set(epoch)) == 20, "no image twice in an epoch; the last 2 wait"
    assert all(np.all(np.diff(pair) > 0) for pair in epoch.reshape(-1, 2)), "sorted chunks"
    saved = iterator.get_state()
    expected = [next(iterator)["image"] for _ in range(7)]
    assert not np.array_equal(np.concatenate(expected[:5]).ravel(), epoch), "reshuffled"
    fresh = prepared.BatchIterator(images, batch_size=4, seed=3, chunks=2)
    fresh.set_state(saved)
    for want in expected:
        np.testing.assert_array_equal(next(fresh)["image"], want)
    with pytest.raises(prepared.PreparedDataError, match="for 22 prepared images, but there "
                                                         "are 21 now"):
        prepared.BatchIterator(images[:21], batch_size=4, seed=3).set_state(saved)


def test_flips_are_deterministic_and_about_half():
    rng = jax.random.PRNGKey(0)
    images = jnp.broadcast_to(jnp.arange(8, dtype=jnp.uint8)[None, :, None],
                              (2, 500, 4, 8, 3))
    flipped = step_lib.random_flips(images, rng, jnp.int32(5))
    again = step_lib.random_flips(images, rng, jnp.int32(5))
    other_step = step_lib.random_flips(images, rng, jnp.int32(6))
    np.testing.assert_array_equal(flipped, again)
    mirrored = np.asarray(flipped[:, :, 0, 0, 0] == 7)
    assert np.all(mirrored | np.asarray(flipped[:, :, 0, 0, 0] == 0))
    assert 0.45 < mirrored.mean() < 0.55
    assert not np.array_equal(flipped, other_step)
    np.testing.assert_array_equal(flipped[mirrored], images[mirrored][:, :, ::-1])


def test_a_file_rewritten_in_place_with_its_old_mtime_changes_the_fingerprint(folder_config):
    source = data.open_source(folder_config.dataset)
    before = source.fingerprint()
    path = source[0]["image"]
    info = os.stat(path)
    content = open(path, "rb").read()
    with open(path, "r+b") as f:
        f.write(bytes(255 - b for b in content[:64]))
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (info.st_size, info.st_mtime_ns)
    assert source.fingerprint() != before


def test_folders_left_by_gone_processes_of_this_host_are_removed(folder_config):
    """A killed preparation leaves its NAME.partial-HOST-PID folder (or NAME.stale-HOST-PID,
    the folder it was replacing): the next start removes those of processes that are gone,
    and keeps those of live processes and of other hosts, whose processes it cannot see."""
    target = data.prepared_folder(folder_config, data.open_source(folder_config.dataset),
                                  prepared.Shard())
    finished = subprocess.Popen(["true"])
    finished.wait()
    host = socket.gethostname()
    gone = [f"{target}.partial-{host}-{finished.pid}", f"{target}.stale-{host}-{finished.pid}"]
    kept = [f"{target}.partial-{host}-{os.getppid()}",  # alive: it started this test
            f"{target}.partial-another-host-{finished.pid}"]
    for folder in gone + kept:
        os.makedirs(os.path.join(folder, "inside"))
    lines = []
    images = prepare(folder_config, lines)
    assert lines[:2] == [f"Removed {folder}, left by process {finished.pid} that is gone"
                         for folder in sorted(gone)]
    assert lines[2].startswith("Preparing 21 records")
    assert sorted(os.listdir(os.path.dirname(target))) == sorted(
        os.path.basename(folder) for folder in [images.path, *kept])
