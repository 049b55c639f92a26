"""dcgan_jax.export: every format reproduces `sample`'s images, runs without dcgan_jax, and
is described by a manifest whose hashes match; bad input is one line; a stopped export
leaves nothing half-written."""

import hashlib
import importlib.metadata
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcgan_jax import checkpoints, exporters, parallel
from dcgan_jax import config as config_lib
from dcgan_jax import step as step_lib

from helpers import run, tree_digest
from tiny_config import tiny_config

CLASS_NAMES = ["zero", "one", "two", "three", "four"]
RUNTIMES = ("stablehlo", "onnx", "savedmodel")


def save_run(workdir, config, class_names=None, seed=0):
    """A workdir holding `config` and its initial state with every weight and BatchNorm
    statistic of G (and the EMA) moved at random, so that each layer shows in the images;
    returns the state."""
    state = step_lib.create_train_state(config, parallel.make_mesh(), total_steps=1)
    rng = np.random.default_rng(seed)

    def moved(path, leaf):
        name = jax.tree_util.keystr(path)
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if "var" in name:
            return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), leaf.dtype)
        if "mean" in name:
            return jnp.asarray(0.3 * noise, leaf.dtype)
        return leaf * 5 + jnp.asarray(0.02 * noise, leaf.dtype)

    g = state.g.replace(params=jax.tree_util.tree_map_with_path(moved, state.g.params),
                        batch_stats=jax.tree_util.tree_map_with_path(moved,
                                                                     state.g.batch_stats))
    ema = state.ema and jax.tree_util.tree_map_with_path(moved, state.ema)
    state = state.replace(g=g, ema=ema)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config_lib.to_json(config))
    manager = checkpoints.make_manager(str(workdir))
    record = {"dataset": config.dataset} | ({"classes": class_names} if class_names else {})
    checkpoints.save(manager, int(state.step), state, dataset=record)
    checkpoints.finish_saves(manager)
    return state


def sample_float_images(workdir, seed, count, use_ema=True):
    """The float images `sample files --seed=SEED` makes of its first `count` latents, and
    those latents (and classes)."""
    from dcgan_jax.sample import Sampler
    sampler = Sampler(str(workdir), use_ema=use_ema)
    inputs = {"z": sampler.latents(seed, count)}
    labels = sampler.classes(count)
    if labels is not None:
        inputs["label"] = labels.astype(np.int32)
    out = sampler._generate(sampler.state, jnp.asarray(inputs["z"]),
                            labels=None if labels is None else jnp.asarray(labels))
    return inputs, np.asarray(out)


CASES = {
    "dcgan32": {},
    "dcgan64": {"model__resolution": 64},
    "msg": {"model__msg": True, "train__ema_decay": 0.0},
    "conditional": {"model__num_classes": 5, "model__g_cond": "cbn"},
    "conditional_concat": {"model__num_classes": 5, "model__g_cond": "concat"},
    "bf16": {"dtype": "bfloat16"},
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_every_format_reproduces_sample_files(case, tmp_path):
    overrides = {"train__ema_decay": 0.999, **CASES[case]}
    config = tiny_config(**overrides)
    conditional = config.model.num_classes > 0
    workdir = tmp_path / "run"
    save_run(workdir, config, CLASS_NAMES if conditional else None)
    generator, state = exporters.restore_generator(str(workdir))
    assert generator.use_ema == (config.train.ema_decay > 0)
    out = tmp_path / "export"
    record = exporters.export(generator, state, list(exporters.FILES), str(out),
                              say=lambda line: None)
    for batch in (1, 7):
        inputs, expected = sample_float_images(workdir, seed=3, count=batch)
        assert expected.shape == (batch, config.model.resolution, config.model.resolution, 1)
        for name in RUNTIMES:
            images = exporters.RUNNERS[name](str(out / exporters.FILES[name]), inputs)
            np.testing.assert_allclose(images, expected, atol=1e-4, err_msg=f"{case} {name}")
    assert record["model"]["num_classes"] == config.model.num_classes
    assert record["model"].get("class_names") == (CLASS_NAMES if conditional else None)
    assert record["source"]["trained_dtype"] == config.dtype
    assert set(record["files"]) == set(exporters.FILES)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(workdir, export folder, manifest) of a conditional tiny G in every format."""
    root = tmp_path_factory.mktemp("exported")
    config = tiny_config(model__num_classes=5, model__g_cond="concat", train__ema_decay=0.99)
    save_run(root / "run", config, CLASS_NAMES)
    generator, state = exporters.restore_generator(str(root / "run"))
    record = exporters.export(generator, state, list(exporters.FILES), str(root / "export"),
                              say=lambda line: None)
    return root / "run", root / "export", record


@pytest.mark.slow
def test_manifest_describes_the_files_and_the_check(exported):
    workdir, out, record = exported
    on_disk = json.loads((out / exporters.MANIFEST).read_text())
    assert on_disk == record
    for name, path in record["files"].items():
        assert (out / path).exists(), name
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                   if p.is_file() and p.name != exporters.MANIFEST)
    assert sorted(record["sha256"]) == files
    for path, digest in record["sha256"].items():
        assert hashlib.sha256((out / path).read_bytes()).hexdigest() == digest, path
    assert record["model"]["class_names"] == CLASS_NAMES
    assert record["inputs"]["label"]["range"] == [0, 4]
    assert record["source"] == {"workdir": str(workdir), "step": 0, "ema": True,
                                "trained_dtype": "float32", "exported_dtype": "float32"}
    errors = record["check"]["max_abs_error"]
    assert errors.pop("safetensors") == "identical" and max(errors.values()) <= 1e-4
    assert record["versions"]["onnx_opset"] == 17 and "tensorflow" in record["versions"]
    # check.npz: the first latents and classes of `sample files --seed=0`, and their images.
    check = np.load(out / exporters.CHECK_FILE)
    inputs, expected = sample_float_images(workdir, seed=0, count=8)
    np.testing.assert_array_equal(check["z"], inputs["z"])
    np.testing.assert_array_equal(check["label"], inputs["label"])
    np.testing.assert_allclose(check["images"], expected, atol=1e-5)  # jit or not
    assert sorted(check) == ["images", "label", "z"]


@pytest.mark.slow
def test_safetensors_hold_g_by_flax_names(exported):
    from safetensors.numpy import load_file
    workdir, out, _ = exported
    generator, _ = exporters.restore_generator(str(workdir))
    tensors = load_file(out / "generator.safetensors")
    assert "params/class_embedding/embedding" in tensors
    assert "batch_stats/BatchNorm_0/mean" in tensors
    flat = exporters.flat_variables(generator.variables)
    assert sorted(tensors) == sorted(flat)
    for name, value in flat.items():
        np.testing.assert_array_equal(tensors[name], value)


@pytest.mark.slow
def test_a_stopped_export_leaves_the_folder_as_it_was(exported, tmp_path, monkeypatch):
    workdir, _, _ = exported
    generator, state = exporters.restore_generator(str(workdir))
    out = tmp_path / "export"
    first = exporters.export(generator, state, ["safetensors"], str(out), say=lambda line: None)

    def stopped(generator, path):
        raise KeyboardInterrupt

    monkeypatch.setitem(exporters.WRITERS, "onnx", stopped)
    with pytest.raises(KeyboardInterrupt):
        exporters.export(generator, state, ["stablehlo", "onnx"], str(out),
                         say=lambda line: None)
    assert json.loads((out / exporters.MANIFEST).read_text()) == first
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no partial folder left
    assert not (out / "generator.stablehlo").exists()
    # An artifact that does not reproduce the trainer's images is not kept either.
    monkeypatch.setitem(exporters.RUNNERS, "stablehlo",
                        lambda path, inputs: np.zeros((len(inputs["z"]), 32, 32, 1)))
    with pytest.raises(exporters.ExportError, match="stablehlo artifact's images differ"):
        exporters.export(generator, state, ["stablehlo"], str(out), say=lambda line: None)
    assert json.loads((out / exporters.MANIFEST).read_text()) == first
    assert sorted(os.listdir(tmp_path)) == ["export"]


@pytest.mark.slow
def test_failed_exports_leave_every_file_of_the_workdir_as_it_was(exported, tmp_path,
                                                                  monkeypatch):
    """Exports to the run's own export/ folder that stop, fail their check or fail to
    convert leave the workdir (checkpoints, config.json, the earlier export) byte for byte."""
    workdir = tmp_path / "run"
    shutil.copytree(exported[0], workdir)
    generator, state = exporters.restore_generator(str(workdir))
    out = workdir / "export" / "step0_ema"
    exporters.export(generator, state, ["safetensors"], str(out), say=lambda line: None)
    before = tree_digest(workdir)
    monkeypatch.setitem(exporters.WRITERS, "onnx", lambda generator, path: 1 / 0)
    with pytest.raises(exporters.ExportError, match="the onnx export failed"):
        exporters.export(generator, state, ["stablehlo", "onnx"], str(out),
                         say=lambda line: None)

    def stopped(generator, path):
        raise KeyboardInterrupt

    monkeypatch.setitem(exporters.WRITERS, "onnx", stopped)
    with pytest.raises(KeyboardInterrupt):
        exporters.export(generator, state, ["onnx"], str(out), say=lambda line: None)
    monkeypatch.setitem(exporters.RUNNERS, "stablehlo",
                        lambda path, inputs: np.zeros((len(inputs["z"]), 32, 32, 1)))
    with pytest.raises(exporters.ExportError, match="stablehlo artifact's images differ"):
        exporters.export(generator, state, ["stablehlo"], str(out), say=lambda line: None)
    assert tree_digest(workdir) == before


@pytest.mark.slow
def test_an_earlier_export_is_replaced_and_other_files_are_refused(exported, tmp_path,
                                                                   monkeypatch):
    workdir, _, _ = exported
    generator, state = exporters.restore_generator(str(workdir))
    out = tmp_path / "export"
    quiet = {"say": lambda line: None}
    exporters.export(generator, state, ["stablehlo"], str(out), **quiet)
    second = exporters.export(generator, state, ["safetensors"], str(out), **quiet)
    assert sorted(os.listdir(out)) == ["check.npz", "generator.json", "generator.safetensors"]
    assert json.loads((out / exporters.MANIFEST).read_text()) == second
    (out / "notes.md").write_text("mine")
    with pytest.raises(exporters.ExportError, match="holds files that are not an earlier "
                       "export's"):
        exporters.export(generator, state, ["safetensors"], str(out), **quiet)
    assert (out / "notes.md").read_text() == "mine"
    # A converter's own failure is one line naming the format, and nothing is written.
    monkeypatch.setitem(exporters.WRITERS, "onnx", lambda generator, path: 1 / 0)
    with pytest.raises(exporters.ExportError, match="the onnx export failed: "
                       "ZeroDivisionError: division by zero; nothing was written"):
        exporters.export(generator, state, ["onnx"], str(tmp_path / "new"), **quiet)
    assert sorted(os.listdir(tmp_path)) == ["export"]


def test_a_killed_export_is_undone_by_the_next(tmp_path, monkeypatch):
    """A killed export's unfinished folder is removed and the earlier export it had moved
    aside is put back; the folders of exports still running are left alone."""
    dead, alive = 2**22 + 12345, os.getpid()
    monkeypatch.setattr(exporters.os, "kill", lambda pid, signal: (
        None if pid == alive else (_ for _ in ()).throw(ProcessLookupError())))
    host = exporters.socket.gethostname()
    folders = {
        "partial_dead": f"{exporters.PARTIAL_PREFIX}{dead}+{host}+out",
        "partial_alive": f"{exporters.PARTIAL_PREFIX}{alive}+{host}+other",
        "partial_elsewhere": f"{exporters.PARTIAL_PREFIX}{dead}+another-host+out",
        "replaced_dead": f"{exporters.REPLACED_PREFIX}{dead}+{host}+out",
    }
    for name in folders.values():
        (tmp_path / name).mkdir()
    (tmp_path / folders["replaced_dead"] / exporters.MANIFEST).write_text("{}")
    exporters._recover(str(tmp_path), str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == sorted(
        [folders["partial_alive"], folders["partial_elsewhere"], "out"])
    assert (tmp_path / "out" / exporters.MANIFEST).read_text() == "{}"


def test_bad_formats_and_folders_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(exporters.ExportError, match="unknown format 'tflite'; the formats "
                       "are stablehlo,onnx,savedmodel,safetensors"):
        exporters.check_formats(["onnx", "tflite"])
    real_find_spec = exporters.importlib.util.find_spec
    monkeypatch.setattr(exporters.importlib.util, "find_spec",
                        lambda name: None if name == "onnxruntime" else real_find_spec(name))
    with pytest.raises(exporters.ExportError, match=r"--formats=onnx needs the onnxruntime "
                       r"package, which is not installed: pip install 'dcgan_jax\[export\]'"):
        exporters.check_formats(["stablehlo", "onnx"])
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(exporters.ExportError, match="is a file; give a folder"):
        exporters.check_output_folder(str(a_file))
    (tmp_path / "other" / "x").mkdir(parents=True)
    with pytest.raises(exporters.ExportError, match="holds files that are not an earlier"):
        exporters.check_output_folder(str(tmp_path / "other"))
    exporters.check_output_folder(str(tmp_path / "new"))


@pytest.mark.slow
def test_command_line_errors_are_one_line(exported, tmp_path):
    workdir, _, _ = exported
    export = ["-m", "dcgan_jax.export"]
    cases = {
        (f"--workdir={tmp_path}",): f"{tmp_path}/config.json does not exist",
        (f"--workdir={workdir}", "--step=7"): "no checkpoint of step 7",
        (f"--workdir={workdir}", "--formats=stablehlo,tflite"): "unknown format 'tflite'",
        (f"--workdir={workdir}", f"--out={tmp_path / 'x.txt'}", "--formats=stablehlo"):
            "is a file",
    }
    (tmp_path / "x.txt").write_text("x")
    for args, expected in cases.items():
        result = run([*export, *args], check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1, result.stderr
        assert lines[0].startswith("dcgan_jax.export: error: ") and expected in lines[0]


@pytest.mark.slow
def test_command_line_exports_the_latest_checkpoint(exported, tmp_path):
    workdir, _, _ = exported
    result = run(["-m", "dcgan_jax.export", f"--workdir={workdir}", "--no_ema",
                  "--formats=stablehlo,safetensors"])
    out = workdir / "export" / "step0"
    assert result.stdout.strip().splitlines()[-1] == str(out / exporters.MANIFEST)
    record = json.loads((out / exporters.MANIFEST).read_text())
    assert record["source"]["ema"] is False and sorted(record["files"]) == [
        "safetensors", "stablehlo"]


def test_export_is_an_extra_the_tests_include():
    """The plain install gains no package: the converters and runtimes are the extra's."""
    requires = importlib.metadata.requires("dcgan_jax")
    name = lambda spec: re.split(r"[<>=;\[ ]", spec)[0]  # noqa: E731
    plain = {name(spec) for spec in requires if "extra ==" not in spec}
    export = {name(spec) for spec in requires if 'extra == "export"' in spec}
    assert export == {"onnx", "onnxruntime", "safetensors"} and not export & plain
    assert any(spec.startswith("dcgan_jax[export]") for spec in requires)
