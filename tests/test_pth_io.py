"""Torch-free checkpoint I/O (damo_jax.interop.pth_io): real-torch fixtures, malicious pickles, round trips.

The fixtures in tests/fixtures/ were written by real torch 2.13 (tests/fixtures/make_pth_fixtures.py);
no test here needs torch.
"""
from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from damo_jax.interop import pth_io
from damo_jax.interop.pth_io import (PthFormatError, UnsafeCheckpointError, load_pth, read_state_dict,
                             save_pth)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
EXPECTED = dict(np.load(FIXTURES / "pth_expected.npz"))
MODEL_KEYS = [k[len("model/"):] for k in EXPECTED if k.startswith("model/")]
TORCH_FILES = ["pth_official.pth", "pth_legacy.pth", "pth_module_prefix.pt", "pth_misc.pkl"]


def expected_model(key: str) -> np.ndarray:
    return EXPECTED[f"model/{key}"]


# ------------------------------------------------------------------ reading real torch files


@pytest.mark.parametrize("name", ["pth_official.pth", "pth_legacy.pth"])
def test_load_pth_official_layout_exact(name):
    ckpt = load_pth(FIXTURES / name)
    assert ckpt["epoch"] == (3 if name == "pth_official.pth" else 10)
    model = ckpt["model"]
    assert isinstance(model, collections.OrderedDict) and list(model) == MODEL_KEYS
    for key in MODEL_KEYS:
        got, want = model[key], expected_model(key)
        assert got.shape == want.shape, key
        assert got.flags.c_contiguous and got.flags.writeable, key
        np.testing.assert_array_equal(got.astype(want.dtype), want, err_msg=key)
    assert model["backbone.stem.bn.num_batches_tracked"].dtype == np.int64
    assert model["backbone.stem.bn.num_batches_tracked"].shape == ()
    assert int(model["backbone.stem.bn.num_batches_tracked"]) == 4  # 3 forwards + 1 (SGD step)
    assert model["head.scales.0.scale"].shape == () and float(model["head.scales.0.scale"]) == 1.25
    assert model["head.half.weight"].dtype == np.float16
    assert model["head.bf16.weight"].dtype == np.float32  # widened from bfloat16 losslessly
    # the strided view (offset 8, stride (6, 1)) of the shared storage
    np.testing.assert_array_equal(model["neck.view.weight"], model["neck.whole.weight"][1:, 2:5])


def test_load_pth_legacy_optimizer_state():
    ckpt = load_pth(FIXTURES / "pth_legacy.pth")
    assert ckpt["feature_loss"] is None
    group = ckpt["optimizer"]["param_groups"][0]
    assert group["lr"] == 0.01 and group["momentum"] == 0.9 and group["nesterov"] is True
    assert group["params"] == [0, 1, 2]
    for index, state in ckpt["optimizer"]["state"].items():
        np.testing.assert_array_equal(state["momentum_buffer"], EXPECTED[f"optimizer/{index}"])


def test_load_pth_misc_globals():
    meta = load_pth(FIXTURES / "pth_misc.pkl")["meta"]
    assert meta["size"] == (2, 3) and meta["device"] == "cpu"
    assert meta["betas"] == (0.9, 0.999) and meta["names"] == ["a", "b"]
    assert meta["flags"] == {True, False}
    for key in ("param", "tagged", "u16"):  # _rebuild_parameter, _rebuild_from_type_v2, _v3
        np.testing.assert_array_equal(meta[key], EXPECTED[f"meta/{key}"])
    assert meta["u16"].dtype == np.uint16


@pytest.mark.parametrize("name", TORCH_FILES)
def test_read_state_dict_all_variants(name):
    sd = read_state_dict(FIXTURES / name)
    assert list(sd) == MODEL_KEYS  # 'model' / bare+'module.' / 'state_dict' variants
    for key, value in sd.items():
        assert value.dtype == (np.int64 if "num_batches" in key else np.float32), key
        np.testing.assert_array_equal(value, expected_model(key).astype(value.dtype), err_msg=key)


def test_read_state_dict_npz_and_errors(tmp_path):
    np.savez(tmp_path / "w.npz", **{"module.a.weight": np.ones((2, 2), np.float64),
                                    "b.num_batches_tracked": np.array(4, np.int32)})
    sd = read_state_dict(tmp_path / "w.npz")
    assert sd["a.weight"].dtype == np.float32 and sd["b.num_batches_tracked"].dtype == np.int64
    save_pth({"epoch": 3, "optimizer": None}, tmp_path / "no_model.pth")
    with pytest.raises(PthFormatError, match=r"no_model\.pth: no state dict"):
        read_state_dict(tmp_path / "no_model.pth")
    with pytest.raises(PthFormatError, match=r"w\.txt.*extension"):
        read_state_dict(tmp_path / "w.txt")
    save_pth({"model": {"a": np.ones(1), "module.a": np.ones(1)}}, tmp_path / "dup.pth")
    with pytest.raises(PthFormatError, match="duplicate key 'a'"):
        read_state_dict(tmp_path / "dup.pth")


# ------------------------------------------------------------------ corrupt / wrong files


def test_truncated_and_corrupt_zip(tmp_path):
    raw = (FIXTURES / "pth_official.pth").read_bytes()
    (tmp_path / "half.pth").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(PthFormatError, match=r"half\.pth.*(corrupt|truncated)"):
        load_pth(tmp_path / "half.pth")
    flipped = bytearray(raw)
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        info = archive.getinfo("pth_official/data/0")
    flipped[info.header_offset + 200] ^= 0xFF  # inside storage 0 (header + 64-byte padding < 200)
    (tmp_path / "crc.pth").write_bytes(bytes(flipped))
    with pytest.raises(PthFormatError, match=r"crc\.pth.*data/0"):
        load_pth(tmp_path / "crc.pth")


def _rewrite_zip(src: Path, dst: Path, drop: str = "", replace: dict | None = None) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if drop and info.filename.endswith(drop):
                continue
            data = (replace or {}).get(info.filename.split("/", 1)[1], zin.read(info))
            zout.writestr(info.filename, data)


def test_missing_storage_and_data_pkl(tmp_path):
    _rewrite_zip(FIXTURES / "pth_official.pth", tmp_path / "nostore.pth", drop="/data/1")
    with pytest.raises(PthFormatError, match=r"nostore\.pth: missing record 'pth_official/data/1'"):
        load_pth(tmp_path / "nostore.pth")
    _rewrite_zip(FIXTURES / "pth_official.pth", tmp_path / "nopkl.pth", drop="/data.pkl")
    with pytest.raises(PthFormatError, match=r"nopkl\.pth: .*data\.pkl"):
        load_pth(tmp_path / "nopkl.pth")
    _rewrite_zip(FIXTURES / "pth_official.pth", tmp_path / "short.pth",
                 replace={"data/0": b"\x00" * 8})
    with pytest.raises(PthFormatError, match=r"short\.pth: record 'pth_official/data/0' holds 8 bytes.*432 bytes.*truncated"):
        load_pth(tmp_path / "short.pth")


def test_wrong_magic_and_truncated_legacy(tmp_path):
    (tmp_path / "text.pth").write_bytes(b"hello, not a checkpoint")
    with pytest.raises(PthFormatError, match=r"text\.pth: wrong magic"):
        load_pth(tmp_path / "text.pth")
    (tmp_path / "int.pth").write_bytes(pickle.dumps(1234, protocol=2) + b"\x80\x02K\x01.")
    with pytest.raises(PthFormatError, match=r"int\.pth: wrong magic number"):
        load_pth(tmp_path / "int.pth")
    raw = (FIXTURES / "pth_legacy.pth").read_bytes()
    for cut in (len(raw) - 10, len(raw) // 2, 40):
        (tmp_path / "cut.pth").write_bytes(raw[:cut])
        with pytest.raises(PthFormatError, match=r"cut\.pth"):
            load_pth(tmp_path / "cut.pth")
    with pytest.raises(PthFormatError, match=r"absent\.pth"):
        load_pth(tmp_path / "absent.pth")


def test_out_of_bounds_view_is_refused(tmp_path):
    payload = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storage"
               b"ctorch\nFloatStorage\nX\x01\x00\x00\x000X\x06\x00\x00\x00cuda:0K\x04tQ"
               b"K\x02K\x03\x85K\x01\x85\x89NtR.")  # 3 elements from offset 2 of 4
    _zip_with_pickle(tmp_path / "oob.pth", payload, storage=np.arange(4, dtype="<f4").tobytes())
    with pytest.raises(PthFormatError, match=r"oob\.pth: tensor on storage 'archive/data/0': .*offset=2.* exceeds the storage's 4 "):
        load_pth(tmp_path / "oob.pth")
    ok = payload.replace(b"K\x02K\x03\x85", b"K\x01K\x03\x85")  # offset 1: fits
    _zip_with_pickle(tmp_path / "ok.pth", ok, storage=np.arange(4, dtype="<f4").tobytes())
    np.testing.assert_array_equal(load_pth(tmp_path / "ok.pth"), [1.0, 2.0, 3.0])


_TENSOR_HEAD = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storage"


def test_big_endian_zip_and_legacy_storage_view(tmp_path):
    payload = (_TENSOR_HEAD + b"ctorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ"
               b"K\x00K\x02K\x02\x86K\x02K\x01\x86\x89NtR.")
    _zip_with_pickle(tmp_path / "be.pth", payload, storage=np.arange(4, dtype=">f4").tobytes(),
                     byteorder=b"big")
    got = load_pth(tmp_path / "be.pth")
    assert got.dtype == np.float32 and got.dtype.isnative
    np.testing.assert_array_equal(got, [[0.0, 1.0], [2.0, 3.0]])
    # legacy persistent id with view metadata (view key '1', offset 1, size 2) of root storage '0'
    data = (_TENSOR_HEAD + b"ctorch\nLongStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04"
            b"(X\x01\x00\x00\x001K\x01K\x02ttQK\x00K\x02\x85K\x01\x85\x89NtR.")
    header = b"".join(pickle.dumps(x, protocol=2) for x in (
        pth_io.LEGACY_MAGIC, pth_io.LEGACY_PROTOCOL, {"little_endian": True}))
    storages = pickle.dumps(["0"], protocol=2) + np.int64(4).tobytes() + \
        np.arange(10, 14, dtype="<i8").tobytes()
    (tmp_path / "view.pth").write_bytes(header + data + storages)
    np.testing.assert_array_equal(load_pth(tmp_path / "view.pth"), [11, 12])


# ------------------------------------------------------------------ malicious pickles


def _zip_with_pickle(path: Path, payload: bytes, storage: bytes | None = None,
                     byteorder: bytes = b"little") -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/byteorder", byteorder)
        if storage is not None:
            archive.writestr("archive/data/0", storage)
        archive.writestr("archive/version", b"3\n")


def _malicious_payloads(marker: Path) -> dict[str, tuple[bytes, str]]:
    cmd = f"touch {marker}".encode()
    code = f"open({str(marker)!r}, 'w').close()".encode()

    class Reduce:
        def __reduce__(self):
            import os
            return os.system, (cmd.decode(),)

    def call(module: bytes, name: bytes, arg: bytes) -> bytes:
        return (b"\x80\x02c" + module + b"\n" + name + b"\nX" + len(arg).to_bytes(4, "little")
                + arg + b"\x85R.")

    return {
        "os.system": (call(b"os", b"system", cmd), "os.system"),
        "posix.system/proto4": (pickle.dumps(Reduce(), protocol=4), "posix.system"),
        "builtins.eval": (call(b"builtins", b"eval", code), "builtins.eval"),
        "builtins.exec": (call(b"builtins", b"exec", code), "builtins.exec"),
        "subprocess.Popen": (b"\x80\x02csubprocess\nPopen\n(X\x05\x00\x00\x00touchX"
                             + len(str(marker)).to_bytes(4, "little") + str(marker).encode()
                             + b"l\x85R.", "subprocess.Popen"),
        "getattr": (b"\x80\x02cbuiltins\ngetattr\n(ccollections\nOrderedDict\n"
                    b"X\x08\x00\x00\x00__init__tR.", "builtins.getattr"),
        "INST opcode": (b"(S'" + cmd + b"'\nios\nsystem\n.", "os.system"),
        "BUILD on allowed function": (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n"
                                      b"N}X\x0c\x00\x00\x00__defaults__)s\x86b.", "BUILD"),
        "module persistent id": (b"\x80\x02(X\x06\x00\x00\x00moduleNtQ.", "persistent id"),
    }


def test_malicious_payloads_work_with_plain_pickle(tmp_path):
    """Positive control: the eval/exec payloads really create the marker with ``pickle.loads``."""
    marker = tmp_path / "pwned"
    for label in ("builtins.eval", "builtins.exec"):
        pickle.loads(_malicious_payloads(marker)[label][0])
        assert marker.exists(), label
        marker.unlink()


@pytest.mark.parametrize("container", ["zip", "plain", "legacy"])
def test_malicious_pickles_are_refused_without_side_effects(tmp_path, container):
    marker = tmp_path / "pwned"
    for label, (payload, refused) in _malicious_payloads(marker).items():
        path = tmp_path / f"evil_{container}.pth"
        if container == "zip":
            _zip_with_pickle(path, payload)
        elif container == "plain":
            path.write_bytes(payload)
        else:  # a valid legacy header, then the malicious data pickle
            header = b"".join(pickle.dumps(x, protocol=2) for x in (
                pth_io.LEGACY_MAGIC, pth_io.LEGACY_PROTOCOL, {"little_endian": True}))
            path.write_bytes(header + payload + pickle.dumps([], protocol=2))
        with pytest.raises(UnsafeCheckpointError, match=refused) as info:
            load_pth(path)
        assert isinstance(info.value, pickle.UnpicklingError)
        assert str(path) in str(info.value), label
        assert not marker.exists(), f"{label} ({container}) executed its payload"
    # nothing was mutated: the official fixture still loads exactly
    np.testing.assert_array_equal(load_pth(FIXTURES / "pth_official.pth")["model"]["neck.view.weight"],
                                  expected_model("neck.view.weight"))


# ------------------------------------------------------------------ writing + round trips


def test_save_pth_round_trip_nested(tmp_path):
    fixture = load_pth(FIXTURES / "pth_official.pth")
    ckpt = {"model": fixture["model"], "epoch": 3, "optimizer": None, "feature_loss": None,
            "extra": [1, -70000, 2**40, 2.5, "é", (True, False), {}, {1: "a"}],
            "bf16": np.array([1.5, -3.0], ml_dtypes.bfloat16)}
    save_pth(ckpt, tmp_path / "out.pth")
    back = load_pth(tmp_path / "out.pth")
    assert list(back) == list(ckpt) and isinstance(back["model"], collections.OrderedDict)
    assert back["extra"] == ckpt["extra"] and back["epoch"] == 3 and back["optimizer"] is None
    np.testing.assert_array_equal(back["bf16"], [1.5, -3.0])
    for key, value in fixture["model"].items():
        assert back["model"][key].dtype == value.dtype and back["model"][key].shape == value.shape
        np.testing.assert_array_equal(back["model"][key], value, err_msg=key)
    assert read_state_dict(tmp_path / "out.pth").keys() == read_state_dict(
        FIXTURES / "pth_official.pth").keys()


def test_save_pth_layout_matches_torch(tmp_path):
    save_pth({"model": {"w": np.ones((2, 3), np.float32)}}, tmp_path / "x.pth")
    with zipfile.ZipFile(tmp_path / "x.pth") as archive:
        names = archive.namelist()
        assert names[0] == "archive/data.pkl" and "archive/byteorder" in names
        assert archive.read("archive/version") == b"3\n"
        info = archive.getinfo("archive/data/0")
        assert info.compress_type == zipfile.ZIP_STORED and info.file_size == 24
    raw = (tmp_path / "x.pth").read_bytes()
    start = info.header_offset + 30 + int.from_bytes(raw[info.header_offset + 26:][:2], "little") \
        + int.from_bytes(raw[info.header_offset + 28:][:2], "little")
    assert start % 64 == 0 and raw[start:start + 24] == np.ones(6, "<f4").tobytes()
    with pytest.raises(TypeError, match=r"\['model'\]\['bad'\]"):
        save_pth({"model": {"bad": object()}}, tmp_path / "bad.pth")
    with pytest.raises(TypeError, match="uint16"):
        save_pth({"w": np.ones(2, np.uint16)}, tmp_path / "bad.pth")


_DTYPES = st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.int32, np.int8,
                           np.uint8, np.bool_, np.dtype(">f4")])


@settings(max_examples=25, deadline=None)
@given(arrays=st.lists(_DTYPES.flatmap(lambda dt: hnp.arrays(
    dt, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4))), max_size=4),
    transpose=st.booleans())
def test_save_load_round_trip_property(tmp_path_factory, arrays, transpose):
    path = tmp_path_factory.mktemp("rt") / "p.pth"
    state = collections.OrderedDict(
        (f"t{i}", a.T if transpose else a) for i, a in enumerate(arrays))
    save_pth({"model": state}, path)
    back = load_pth(path)["model"]
    assert list(back) == list(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype.newbyteorder("=") and back[key].shape == value.shape
        np.testing.assert_array_equal(back[key], value)


def test_golden_T_state_dict_survives_save_and_read(tmp_path):
    """A full DAMO-YOLO-T state dict (586 entries, golden recipe) in the official checkpoint layout:
    save_pth -> read_state_dict keeps every byte (golden sha256) and convert loads it strictly."""
    import hashlib

    from golden_weights import golden_state_dict, load_model_json

    from damo_jax.interop.convert import load_official_checkpoint

    sd = golden_state_dict("T", verify=False)
    path = tmp_path / "epoch_300_ckpt.pth"
    save_pth({"epoch": 300, "model": collections.OrderedDict(sd), "optimizer": None,
              "feature_loss": None}, path)
    back = read_state_dict(path)
    assert sorted(back) == sorted(sd)
    whole = hashlib.sha256()
    for key in sorted(back):
        assert back[key].dtype == sd[key].dtype and back[key].shape == sd[key].shape, key
        whole.update(back[key].tobytes())
    assert whole.hexdigest() == load_model_json("T")["weights"]["state_dict_sha256"]
    variables = load_official_checkpoint(path, "t")
    assert set(variables) >= {"params", "batch_stats"}


def test_save_pth_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    save_pth({"model": {"w": np.ones(3, np.float32)}}, path)
    before = path.read_bytes()
    calls = []

    def failing_writestr(self, info, data, *args, **kwargs):
        calls.append(info)
        if len(calls) > 2:
            raise OSError("disk full")
        return original(self, info, data, *args, **kwargs)

    original = zipfile.ZipFile.writestr
    monkeypatch.setattr(zipfile.ZipFile, "writestr", failing_writestr)
    with pytest.raises(OSError, match="disk full"):
        save_pth({"model": {"w": np.zeros(5, np.float32)}}, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth"]


def test_save_pth_files_get_the_umask_permissions(tmp_path):
    """A saved .pth is readable as any other output file (mkstemp's 0600 used to leak through)."""
    import os
    old = os.umask(0o022)
    try:
        save_pth({"w": np.ones(2, np.float32)}, tmp_path / "a.pth")
        os.umask(0o077)
        save_pth({"w": np.ones(2, np.float32)}, tmp_path / "b.pth")
    finally:
        os.umask(old)
    assert (tmp_path / "a.pth").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.pth").stat().st_mode & 0o777 == 0o600
