"""Labels from every source, paired with their images through every path of the pipeline."""

import hashlib
import os

import numpy as np
import pytest

from dcgan_jax import data, names, parallel, prepared

from helpers import colour_classes, coloured_class_folder, random_image_folder
from tiny_config import tiny_config


def quiet(line):
    del line


def assert_paired(batch):
    """Each image of a batch of coloured squares has its class's colour."""
    assert batch["label"].dtype == np.int32 and batch["label"].shape == batch["image"].shape[:1]
    assert colour_classes(batch["image"]) == batch["label"].tolist()


def close(iterator):
    if isinstance(iterator, data.pipeline.WorkerIterator):
        iterator.close()


@pytest.fixture
def squares_config(tmp_path):
    """Squares of one colour per class subfolder (5 each, some nested), a truncated file in
    c1; 16 records, batches of 4."""
    root = coloured_class_folder(str(tmp_path / "squares"), per_class=5)
    return tiny_config(dataset=f"folder:{root}", model__channels=3, train__batch_size=4,
                       data__cache_dir=str(tmp_path / "cache"))


def test_the_registry_holds_the_source_kinds_the_schema_lists():
    assert tuple(data.SOURCES) == names.SOURCE_KINDS


def test_class_subfolders_are_the_classes_in_sorted_order(tmp_path):
    root = tmp_path / "pets"
    for name, count in (("dog", 2), ("cat", 3), ("ant", 1)):
        random_image_folder(root / name, count, (8, 8, 3))
    random_image_folder(root / "cat" / "kittens", 2, (8, 8, 3))
    (root / "no_images").mkdir()
    (root / "notes.txt").write_text("not an image: the folder stays labelled")
    source = data.open_source(f"folder:{root}")
    assert source.class_names == ("ant", "cat", "dog") and source.num_classes == 3
    assert [r["image"] for r in source] == data.list_image_files(str(root))
    by_file = {os.path.relpath(r["image"], root): source.class_names[r["label"]]
               for r in source}
    assert by_file == {"ant/00.png": "ant", "cat/00.png": "cat", "cat/01.png": "cat",
                       "cat/02.png": "cat", "cat/kittens/00.png": "cat",
                       "cat/kittens/01.png": "cat", "dog/00.png": "dog", "dog/01.png": "dog"}
    assert source.identity()["classes"] == ["ant", "cat", "dog"]


def test_images_directly_in_the_folder_mean_no_labels(tmp_path):
    root = tmp_path / "photos"
    random_image_folder(root, 2, (8, 8, 3))
    random_image_folder(root / "holidays", 3, (8, 8, 3))
    source = data.open_source(f"folder:{root}")
    assert len(source) == 5, "the subfolders' images are read all the same"
    assert source.class_names == () and source.num_classes == 0
    assert all(set(r) == {"image"} for r in source) and "classes" not in source.identity()


def test_moving_a_file_to_another_class_changes_the_prepared_fingerprint(tmp_path):
    root = tmp_path / "squares"
    coloured_class_folder(str(root), per_class=3, unreadable=False)
    before = data.open_source(f"folder:{root}")
    fingerprint, identity = before.fingerprint(), before.identity()
    moved = root / "c1" / "00.png"
    info = os.stat(moved)
    os.rename(moved, root / "c2" / "03.png")  # the same bytes, times and size
    os.utime(root / "c2" / "03.png", ns=(info.st_atime_ns, info.st_mtime_ns))
    after = data.open_source(f"folder:{root}")
    assert len(after) == len(before) and after.class_names == before.class_names
    assert after.fingerprint() != fingerprint
    assert after.identity()["fingerprint"] != identity["fingerprint"]


def test_identities_keep_the_digests_of_earlier_checkpoints(tmp_path):
    """Checkpoints saved before labels recorded these digests; they still match."""
    demo = data.open_source("demo:mnist")
    digest = hashlib.sha256(f"{demo.images.shape}{demo.images.dtype}".encode())
    digest.update(demo.images.tobytes())
    assert demo.identity() == {"dataset": "demo:mnist", "records": 5000,
                               "fingerprint": digest.hexdigest(),
                               "classes": [str(d) for d in range(10)]}
    root = coloured_class_folder(str(tmp_path / "squares"), per_class=2)
    folder = data.open_source(f"folder:{root}")
    digest = hashlib.sha256()
    for path in data.list_image_files(root):
        digest.update(f"{os.path.relpath(path, root)}\t{os.path.getsize(path)}\n".encode())
    assert folder.identity()["fingerprint"] == digest.hexdigest()


# Worker processes take seconds to start: one shard of two is read with them.
@pytest.mark.parametrize("mode,workers,shards", [("auto", 0, (0, 1)), ("off", 0, (0, 1)),
                                                 ("off", 1, (1,))])
def test_coloured_squares_keep_their_labels_shuffled_sharded_and_resumed(squares_config, mode,
                                                                        workers, shards):
    config = squares_config
    config.data.prepared, config.data.num_workers = mode, workers
    source = data.open_source(config.dataset)
    assert source.class_names == ("c0", "c1", "c2") and len(source) == 16
    first_epoch = []
    for index in shards:
        iterator = data.make_pipeline(config, source, index, 2, say=quiet)
        batches = [next(iterator) for _ in range(2)]
        saved = iterator.get_state()
        batches += [next(iterator) for _ in range(6)]  # past the end of the first epoch
        close(iterator)
        for batch in batches:
            assert_paired(batch)
        first_epoch.extend(np.concatenate([b["label"] for b in batches[:3]]).tolist())
        fresh = data.make_pipeline(config, source, index, 2, say=quiet)
        fresh.set_state(saved)
        for want in batches[2:]:
            got = next(fresh)
            np.testing.assert_array_equal(got["image"], want["image"])
            np.testing.assert_array_equal(got["label"], want["label"])
        close(fresh)
    assert first_epoch != sorted(first_epoch), "shuffled, not in the folder's class order"
    assert set(first_epoch) == {0, 1, 2}


def test_prepared_labels_beside_the_images(squares_config):
    source = data.open_source(squares_config.dataset)
    lines = []
    shards = [data.prepare_shard(squares_config, source, prepared.Shard(i, 2), lines.append,
                                 workers=workers) for i, workers in ((0, 0), (1, 1))]
    for shard in shards:
        assert shard.meta["classes"] == ["c0", "c1", "c2"]
        assert colour_classes(shard.images) == shard.labels.tolist()
        assert os.path.getsize(os.path.join(shard.path, prepared.LABELS_FILE)) == \
            4 * len(shard.images)
    assert sum(s.meta["unreadable_count"] for s in shards) == 1
    assert sorted(np.concatenate([s.labels for s in shards]).tolist()) == [0] * 5 + [1] * 5 + [
        2] * 5, "the truncated file of c1 left out with its label: c1 has its 5 squares"
    expected = np.array(shards[0].labels)
    labels_path = os.path.join(shards[0].path, prepared.LABELS_FILE)
    with open(labels_path, "r+b") as f:
        f.truncate(8)
    with pytest.raises(prepared.PreparedDataError, match="labels.i32 holds 8 bytes, not the "
                                                         "32 of 8 labels: it is truncated"):
        prepared.open_prepared(shards[0].path)
    lines.clear()
    rebuilt = data.prepare_shard(squares_config, source, prepared.Shard(0, 2), lines.append)
    assert "it is truncated" in lines[0]
    np.testing.assert_array_equal(rebuilt.labels, expected)


def test_figure_images_of_given_classes(squares_config):
    source = data.open_source(squares_config.dataset)
    images, labels = data.sample_images(squares_config, source, 6)
    assert colour_classes(images) == labels.tolist()
    classes = np.array([2, 0, 1, 1, 2, 0, 0, 0, 0, 0, 0, 0], np.int32)
    images, labels = data.sample_images(squares_config, source, len(classes), classes=classes)
    np.testing.assert_array_equal(labels, classes)
    assert colour_classes(images) == classes.tolist()
    assert len({image.shape for image in images}) == 1
    c0 = images[classes == 0]
    assert len({image.tobytes() for image in c0}) == 1, "one colour; repeats beyond 5 are fine"
    again, _ = data.sample_images(squares_config, source, len(classes), classes=classes)
    np.testing.assert_array_equal(again, images)
    with pytest.raises(data.DataError, match="class 3 was asked of config.dataset="):
        data.sample_images(squares_config, source, 1, classes=np.array([3]))


def test_evaluation_batches_carry_labels(squares_config):
    source = data.open_source(squares_config.dataset)
    batches = list(data.evaluation_batches(squares_config, source, 16, 4))
    assert all(set(batch) == {"image", "label"} for batch in batches)
    for batch in batches:
        assert_paired(batch)
    assert sum(len(batch["label"]) for batch in batches) == 15


def test_device_batches_send_images_and_labels_only(squares_config):
    config = squares_config
    config.data.prepared, config.train.d_steps = "off", 2
    source = data.open_source(config.dataset)
    seen = []
    batches = data.DeviceBatches(data.make_pipeline(config, source, 0, 1, say=quiet),
                                 parallel.make_mesh(), config.train.d_steps, seen.append)
    batch, position = batches.take()
    assert set(batch) == {"image", "label"} and "skipped" in seen[0]
    assert batch["image"].shape == (2, 4, 32, 32, 3) and batch["label"].shape == (2, 4)
    assert batch["label"].dtype == np.int32
    assert_paired({"image": np.asarray(batch["image"]).reshape(8, 32, 32, 3),
                   "label": np.asarray(batch["label"]).reshape(8)})
    assert isinstance(position.get_state(), bytes)


def digit_labels(source, config):
    """Label of each preprocessed image of `source`, by its bytes."""
    loader = data.Loader(config.model.resolution, config.model.channels, config.data.crop)
    labels = {}
    for record in source:
        element = loader(record)
        labels.setdefault(element["image"].tobytes(), set()).add(int(element["label"]))
    return labels


def assert_known_pairs(batch, labels):
    for image, label in zip(batch["image"], batch["label"], strict=True):
        assert int(label) in labels[image.tobytes()]


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_demo_digits_keep_their_labels(mode):
    config = tiny_config(data__prepared=mode, train__batch_size=8)
    source = data.open_source(config.dataset)
    assert source.class_names == tuple("0123456789")
    labels = digit_labels(source, config)
    iterator = data.make_pipeline(config, source, 1, 2, say=quiet)
    next(iterator)
    saved = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]
    fresh = data.make_pipeline(config, source, 1, 2, say=quiet)
    fresh.set_state(saved)
    for want in expected:
        assert_known_pairs(want, labels)
        got = next(fresh)
        np.testing.assert_array_equal(got["label"], want["label"])
        np.testing.assert_array_equal(got["image"], want["image"])


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_tfds_labels_are_read_with_each_example(mode, tmp_path):
    import tensorflow_datasets as tfds
    config = tiny_config(dataset="tfds:mnist:train", train__batch_size=4,
                         data__prepared=mode, data__cache_dir=str(tmp_path))
    with tfds.testing.mock_data(num_examples=12):
        source = data.open_source(config.dataset)
        assert source.class_names == tuple("0123456789")
        assert source.identity()["classes"] == list("0123456789")
        labels = digit_labels(source, config)
        iterator = data.make_pipeline(config, source, 0, 1, say=quiet)
        batches = [next(iterator) for _ in range(5)]
        images, drawn = data.sample_images(config, source, 4, classes=np.array(
            [int(source[0]["label"])] * 4))
    for batch in batches:
        assert_known_pairs(batch, labels)
    assert_known_pairs({"image": images, "label": drawn}, labels)


def test_a_tfds_dataset_without_the_label_feature_is_unlabelled(tmp_path):
    import tensorflow_datasets as tfds
    config = tiny_config(dataset="tfds:mnist", train__batch_size=4, data__prepared="off")
    with tfds.testing.mock_data(num_examples=8):
        source = data.open_source(config.dataset, label_key="digit")
        assert source.num_classes == 0 and "classes" not in source.identity()
        batch = next(data.make_pipeline(config, source, 0, 1, say=quiet))
        labelled = data.open_source(config.dataset)
        assert labelled.fingerprint() != source.fingerprint()
    assert "label" not in batch
