"""The grain pipeline over the demo digits and image folders."""

import warnings

import numpy as np
import pytest
from PIL import Image

from dcgan_jax import data
from tiny_config import tiny_config


@pytest.fixture
def image_folder(tmp_path):
    """Colour JPEGs and PNGs in nested folders, odd modes, a truncated file, a text file."""
    rng = np.random.default_rng(0)
    (tmp_path / "a" / "b").mkdir(parents=True)
    for i in range(12):
        array = rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)
        folder = tmp_path / ("a" if i % 2 else "a/b")
        Image.fromarray(array).save(folder / f"img{i}.{'jpg' if i % 3 else 'png'}")
    Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8)).save(tmp_path / "gray.png")
    Image.fromarray(rng.integers(0, 256, (30, 30, 4), dtype=np.uint8)).save(tmp_path / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).convert(
        "P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "palette.gif")
    whole = (tmp_path / "img0.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(whole)
    (tmp_path / "truncated.png").write_bytes(whole.read_bytes()[:200])
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_folder_lists_images_recursively(image_folder):
    paths = data.list_image_files(str(image_folder))
    assert len(paths) == 12 + 5 and not any(p.endswith(".txt") for p in paths)
    assert paths == data.list_image_files(str(image_folder))  # a stable order


def test_preprocess_matches_pillow(image_folder):
    path = str(image_folder / "a" / "img1.jpg")
    got = data.preprocess(path, 32, 3, "center")
    with Image.open(path) as image:
        w, h = image.size
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
        want = np.asarray(image.convert("RGB").crop(box).resize((32, 32),
                                                                Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(got, want)
    boxed = data.preprocess(path, 16, 3, "2,3,20,20")
    with Image.open(path) as image:
        want = np.asarray(image.convert("RGB").crop((3, 2, 23, 22)).resize(
            (16, 16), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(boxed, want)


@pytest.mark.parametrize("name", ["gray.png", "rgba.png", "palette.gif", "img0.png"])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_mode_becomes_the_model_channels(image_folder, name, channels):
    image = data.preprocess(str(image_folder / name), 32, channels, "center")
    assert image.shape == (32, 32, channels) and image.dtype == np.uint8


def test_pipeline_skips_unreadable_files(image_folder):
    config = tiny_config(dataset=f"folder:{image_folder}", train__batch_size=4,
                         model__channels=3)
    source = data.open_source(config.dataset)
    iterator = data.make_pipeline(config, source, 0, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = [next(iterator) for _ in range(8)]  # two passes over 16 readable images
    assert all(b.shape == (4, 32, 32, 3) and b.dtype == np.uint8 for b in batches)
    assert any("truncated.png" in str(w.message) for w in caught)
    first, second = np.concatenate(batches[:4]), np.concatenate(batches[4:])
    assert not np.array_equal(first, second), "each epoch is reshuffled"


def test_demo_digits_and_shards():
    config = tiny_config()
    source = data.open_source(config.dataset)
    assert len(source) == 5000
    shards = [list(data.shard(np.arange(len(source)), i, 2)) for i in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(5000))
    assert data.steps_per_epoch(config, source, 1) == 5000 // 16


def test_resumed_iterator_continues_exactly():
    config = tiny_config()
    source = data.open_source(config.dataset)
    iterator = data.make_pipeline(config, source, 0, 1)
    for _ in range(3):
        next(iterator)
    saved = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]
    fresh = data.make_pipeline(config, source, 0, 1)
    fresh.set_state(saved)
    for want in expected:
        np.testing.assert_array_equal(next(fresh), want)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.open_source(f"folder:{tmp_path / 'missing'}")
    with pytest.raises(data.DataError, match="holds no image files"):
        data.open_source(f"folder:{tmp_path}")
    config = tiny_config(train__batch_size=64)
    with pytest.raises(data.DataError, match="fewer than one step needs"):
        data.steps_per_epoch(config, np.zeros((10, 28, 28), np.uint8), 1)
