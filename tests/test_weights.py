"""The FID weights reader and check against crafted files: no code in a weights file runs, no
tensor reads outside its storage, and only pytorch-fid's file is used without the flag, fetched
or given. Fast and offline: the files are written here, without PyTorch."""

import builtins
import collections
import errno
import io
import os
import pickle
import shlex
import zipfile

import numpy as np
import pytest

from dcgan_jax.evaluation import weights

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
SYSTEM_INFO = {"protocol_version": 1001, "little_endian": True,
               "type_sizes": {"short": 2, "int": 4, "long": 4}}


class FloatStorage:
    """Pickled by name, then renamed to torch.FloatStorage."""


def _rebuild_tensor_v2(*args):
    """Pickled by name, then renamed to torch._utils._rebuild_tensor_v2."""


class Storage:
    def __init__(self, key, values):
        self.key, self.values = key, np.asarray(values, np.float32)


class Tensor:
    def __init__(self, storage, offset, shape, stride, state=None):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride
        self.state = state

    def __reduce__(self):
        args = (self.storage, self.offset, self.shape, self.stride, False,
                collections.OrderedDict())
        return (_rebuild_tensor_v2, args) if self.state is None else (
            _rebuild_tensor_v2, args, self.state)


class Payload:
    """Unpickled by plain `pickle`, it creates `marker`."""

    def __init__(self, kind, marker):
        self.kind, self.marker = kind, str(marker)

    def __reduce__(self):
        if self.kind == "os.system":
            return os.system, (f"touch {shlex.quote(self.marker)}",)
        if self.kind == "builtins.exec":
            return builtins.exec, (f"open({self.marker!r}, 'w').close()",)
        return builtins.open, (self.marker, "w")


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", FloatStorage, obj.key, "cpu", len(obj.values))
        return None


def dumps(obj) -> bytes:
    """A pickle as PyTorch writes one (protocol 2, storages as persistent ids)."""
    out = io.BytesIO()
    _Pickler(out, protocol=2).dump(obj)
    data = out.getvalue()
    for name, module in (("_rebuild_tensor_v2", "torch._utils"), ("FloatStorage", "torch")):
        data = data.replace(f"c{__name__}\n{name}\n".encode(), f"c{module}\n{name}\n".encode())
    return data


def storages_of(state):
    found = {}
    for value in state.values():
        if isinstance(value, Tensor):
            found[value.storage.key] = value.storage
    return found


def write_legacy(path, state, **parts) -> str:
    """The pre-1.6 format; `parts` replace its magic, protocol, system, keys or counts."""
    storages = storages_of(state)
    keys = parts.get("keys", sorted(storages))
    out = b"".join(dumps(parts.get(name, default)) for name, default in (
        ("magic", LEGACY_MAGIC), ("protocol", 1001), ("system", SYSTEM_INFO)))
    out += dumps(state) + dumps(keys)
    for key in sorted(storages):
        values = storages[key].values
        out += parts.get("count", len(values)).to_bytes(8, "little") + values.tobytes()
    with open(path, "wb") as f:
        f.write(out)
    return str(path)


def write_zip(path, state, compress=zipfile.ZIP_STORED) -> str:
    """The zip format of PyTorch >= 1.6."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", dumps(state), compress_type=compress)
        for key, storage in storages_of(state).items():
            archive.writestr(f"archive/data/{key}", storage.values.tobytes(),
                             compress_type=compress)
    return str(path)


WRITERS = {"legacy": write_legacy, "zip": write_zip}


def valid_state():
    """Six floats shared by a matrix, its transpose and an offset view."""
    storage = Storage("0", np.arange(6))
    return collections.OrderedDict(
        matrix=Tensor(storage, 0, (2, 3), (3, 1)), transposed=Tensor(storage, 0, (3, 2), (1, 3)),
        tail=Tensor(storage, 4, (2,), (1,)), bias=Tensor(Storage("1", [7, 8]), 0, (2,), (1,)))


def refused(path, *needles):
    """read_state_dict's one-line error, with `needles` in it."""
    with pytest.raises(weights.WeightsError) as info:
        weights.read_state_dict(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.mark.parametrize("fmt", ["legacy", "zip"])
def test_crafted_files_read(tmp_path, fmt):
    """The writers above make files the reader accepts, so the refusals below are not
    refusals of a malformed container."""
    path = WRITERS[fmt](tmp_path / "ok.pth", valid_state())
    got = weights.read_state_dict(path)
    matrix = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(got["matrix"], matrix)
    np.testing.assert_array_equal(got["transposed"], matrix.T)
    np.testing.assert_array_equal(got["tail"], [4, 5])
    np.testing.assert_array_equal(got["bias"], [7, 8])


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "builtins.open"])
def test_payloads_run_under_plain_pickle(tmp_path, kind):
    """The payloads are live: only the reader's refusal keeps them from running."""
    marker = tmp_path / "marker"
    pickle.loads(dumps(Payload(kind, marker)))
    assert marker.exists()


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "builtins.open"])
@pytest.mark.parametrize("fmt,position", [
    ("legacy", "magic"), ("legacy", "protocol"), ("legacy", "system"), ("legacy", "state"),
    ("legacy", "keys"), ("zip", "state")])
def test_no_code_runs(tmp_path, fmt, position, kind):
    marker = tmp_path / "marker"
    payload = Payload(kind, marker)
    state = valid_state()
    if position == "state":
        state["evil"] = payload
        path = WRITERS[fmt](tmp_path / "evil.pth", state)
    else:
        path = write_legacy(tmp_path / "evil.pth", state, **{position: payload})
    refused(path, "refusing to load")
    assert not marker.exists()


@pytest.mark.parametrize("offset,shape,stride,needle", [
    (6, (1,), (1,), "outside its storage"),
    (-1, (2,), (1,), "offset -1"),
    (0, (2, 3), (3, 2), "outside its storage"),
    (5, (3,), (-1,), "stride (-1,)"),
    (0, (-1,), (1,), "shape (-1,)"),
    (0, (3,), (2 ** 62,), "outside its storage"),
    (0, (10 ** 6, 10 ** 6), (0, 0), "more elements than its storage"),
    (0.5, (2,), (1,), "integer offset"),
    (0, "ab", (1,), "not integers"),
])
@pytest.mark.parametrize("fmt", ["legacy", "zip"])
def test_tensor_outside_its_storage_is_refused(tmp_path, fmt, offset, shape, stride, needle):
    state = {"w": Tensor(Storage("0", np.arange(6)), offset, shape, stride)}
    refused(WRITERS[fmt](tmp_path / "bad.pth", state), needle)


def test_tensor_state_cannot_be_overwritten(tmp_path):
    """Pickle's BUILD could move a checked tensor's offset after its constructor ran."""
    state = {"w": Tensor(Storage("0", np.arange(6)), 0, (2,), (1,), state={"offset": 10 ** 9})}
    refused(write_zip(tmp_path / "built.pth", state), "refusing to set the state")


def test_storages_larger_than_the_file_are_refused(tmp_path):
    state = valid_state()
    refused(write_legacy(tmp_path / "count.pth", state, count=2 ** 40),
            "larger than the rest of the file")
    refused(write_legacy(tmp_path / "keys.pth", state, keys=["0"]), "storage list")
    refused(write_zip(tmp_path / "deflated.pth", state, zipfile.ZIP_DEFLATED), "compressed")


def one_line(call, *needles):
    with pytest.raises(weights.WeightsError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_known_digest():
    assert len(weights.WEIGHTS_SHA256) == 64
    assert weights.WEIGHTS_SHA256.startswith(weights.WEIGHTS_NAME.rsplit("-", 1)[1])


def test_unknown_weights_need_the_flag(tmp_path, monkeypatch):
    path = write_zip(tmp_path / "other.pth", valid_state())
    digest = weights.file_digest(path)
    cache = str(tmp_path / "cache")
    one_line(lambda: weights.locate(path, cache), path, f"SHA-256 {digest[:16]}",
             "--allow_unknown_weights")
    assert weights.locate(path, cache, allow_unknown=True) == path
    assert set(weights.read_state_dict(path)) == {"matrix", "transposed", "tail", "bias"}
    npz = str(tmp_path / "converted.npz")
    weights.save_npz(weights.read_state_dict(path), npz)
    one_line(lambda: weights.check(npz), npz, "--allow_unknown_weights")
    monkeypatch.setattr(weights, "WEIGHTS_SHA256", digest)
    assert weights.locate(path, cache) == path  # pytorch-fid's file needs no flag
    assert not os.path.exists(cache)


def test_cached_conversion_is_trusted(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    converted = str(cache / f"{weights.WEIGHTS_NAME}.npz")
    weights.save_npz({"fc.bias": np.zeros(3, np.float32)}, converted)
    monkeypatch.setenv(weights.URL_VARIABLE, (tmp_path / "absent.pth").as_uri())
    assert weights.locate("", str(cache)) == converted


@pytest.mark.parametrize("allow_unknown", [False, True])
def test_mirror_with_another_file_is_refused(tmp_path, monkeypatch, allow_unknown):
    """Whatever the flag says: the cache holds pytorch-fid's file only."""
    served = write_legacy(tmp_path / "served.pth", valid_state())
    monkeypatch.setenv(weights.URL_VARIABLE, (tmp_path / "served.pth").as_uri())
    cache = tmp_path / "home" / ".cache" / "weights"
    one_line(lambda: weights.locate("", str(cache), allow_unknown),
             weights.file_digest(served)[:16], "nothing was kept", weights.URL_VARIABLE)
    assert not (tmp_path / "home").exists()

    cache.mkdir(parents=True)  # a folder that was there stays, empty
    one_line(lambda: weights.locate("", str(cache)), "nothing was kept")
    assert os.listdir(cache) == []


def test_unreachable_mirror_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(weights.URL_VARIABLE, (tmp_path / "absent.pth").as_uri())
    one_line(lambda: weights.locate("", str(tmp_path / "cache")), "cannot be fetched",
             "--fid_weights=PATH")
    assert not (tmp_path / "cache").exists()


def test_mirror_with_pytorch_fids_file_is_converted_once(tmp_path, monkeypatch):
    served = write_legacy(tmp_path / "served.pth", valid_state())
    monkeypatch.setattr(weights, "WEIGHTS_SHA256", weights.file_digest(served))
    monkeypatch.setenv(weights.URL_VARIABLE, (tmp_path / "served.pth").as_uri())
    cache = tmp_path / "cache"
    path = weights.locate("", str(cache))
    assert os.listdir(cache) == [f"{weights.WEIGHTS_NAME}.npz"]
    os.remove(served)  # a second call must not fetch
    assert weights.locate("", str(cache)) == path
    np.testing.assert_array_equal(weights.read_state_dict(path)["tail"], [4, 5])


def test_an_unreadable_cached_conversion_is_moved_aside_and_fetched_again(
        tmp_path, monkeypatch, capsys):
    """Written by us, it would otherwise fail every run until someone deletes it."""
    served = write_legacy(tmp_path / "served.pth", valid_state())
    monkeypatch.setattr(weights, "WEIGHTS_SHA256", weights.file_digest(served))
    monkeypatch.setenv(weights.URL_VARIABLE, (tmp_path / "served.pth").as_uri())
    cache = tmp_path / "cache"
    converted = cache / f"{weights.WEIGHTS_NAME}.npz"
    weights.save_npz(weights.read_state_dict(served), str(converted))
    good = converted.read_bytes()
    converted.write_bytes(good[:len(good) // 2])  # truncated

    assert weights.locate("", str(cache)) == str(converted)
    moved, fetching = capsys.readouterr().out.splitlines()
    bad = [name for name in os.listdir(cache) if ".bad-" in name]
    assert len(bad) == 1 and (cache / bad[0]).read_bytes() == good[:len(good) // 2]
    assert moved.startswith(f"FID weights file {converted} cannot be read (")
    assert moved.endswith(f"; moved it to {cache / bad[0]}")
    assert fetching.startswith("Fetching the FID weights from ")
    np.testing.assert_array_equal(weights.read_state_dict(str(converted))["tail"], [4, 5])

    converted.write_bytes(b"not a zip file")  # offline now: moved aside all the same
    monkeypatch.setenv(weights.URL_VARIABLE, (tmp_path / "absent.pth").as_uri())
    one_line(lambda: weights.locate("", str(cache)), "cannot be fetched", "--fid_weights=PATH")
    assert not converted.exists()


def test_a_given_unreadable_file_is_named_and_left_alone(tmp_path):
    given = tmp_path / f"{weights.WEIGHTS_NAME}.npz"
    given.write_bytes(b"not a zip file")
    assert weights.locate(str(given), str(tmp_path), allow_unknown=True) == str(given)
    one_line(lambda: weights.read_state_dict(str(given)), f"FID weights file {given} cannot "
             f"be read", f"fetch it again from {weights.WEIGHTS_URL}")
    assert os.listdir(tmp_path) == [given.name]


def test_a_cached_conversion_that_cannot_be_moved_aside_is_named(tmp_path, monkeypatch):
    converted = tmp_path / f"{weights.WEIGHTS_NAME}.npz"
    converted.write_bytes(b"not a zip file")

    def read_only(source, target):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(weights.paths, "move", read_only)
    one_line(lambda: weights.locate("", str(tmp_path)), f"FID weights file {converted} "
             f"cannot be read, nor moved aside (Read-only file system); remove it")
