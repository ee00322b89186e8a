"""Hard bounds of the torch-free ``.pth`` reader (issue 10): crafted files (tests/pth_crafted.py)
that amplify memory, nest deeply, share containers, lie in zip headers or mutate allowed objects
get one ``PthFormatError`` / ``UnsafeCheckpointError`` naming the file and the record, and peak
memory (measured in a subprocess) stays a small multiple of the tensor data the file really holds."""
from __future__ import annotations

import collections
import io
import pickle
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

import pth_crafted as crafted
from damo_jax.errors import UserError, user_error_types
from damo_jax.interop.pth_io import PthFormatError, UnsafeCheckpointError, load_pth, read_state_dict

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MIB = 1 << 20


# ----------------------------------------------------------------------------- peak memory
@pytest.mark.parametrize("name, build, outcome, message", [
    ("stride0", crafted.stride0_view, "PthFormatError", r"declares 1600000000 elements"),
    ("bomb", lambda p: crafted.deflate_bomb(p, 64 * MIB), "PthFormatError",
     r"record 'archive/data/0' holds 67108864 bytes but its storage declares .* 16 bytes"),
    ("lying", lambda p: crafted.lying_bomb(p, 64 * MIB), "PthFormatError",
     r"record 'archive/data/0'"),
    ("dag", crafted.legacy_dag, "PthFormatError", r"expands to more than \d+ elements"),
    ("views", crafted.many_transposed_views, "PthFormatError", r"views re-reading the same storage"),
    ("pickle", crafted.pickle_bomb, "PthFormatError",
     r"record 'archive/data\.pkl' inflates \d+ bytes to 2000003 \(a pickle bomb"),
])
def test_amplification_is_refused_with_small_peak_memory(tmp_path, name, build, outcome, message):
    path = build(tmp_path / f"{name}.pth")
    result = crafted.probe(path)
    assert result["outcome"] == outcome, result
    assert result["message"].startswith(str(path)), result["message"]
    assert re.search(message, result["message"]), result["message"]
    assert result["peak_mb"] - result["baseline_mb"] < 40, result


def test_real_big_tensor_loads_with_peak_about_its_size(tmp_path):
    """64 MiB of zeros deflated to ~64 KB: it is a real tensor, so it loads, at ~1x its size."""
    result = crafted.probe(crafted.big_zeros(tmp_path / "zeros.pth", 64 * MIB))
    assert result["outcome"] == "loaded", result
    assert result["peak_mb"] - result["baseline_mb"] < 64 * 1.25 + 8, result


def test_byte_cap_argument_and_environment(tmp_path, monkeypatch):
    path = crafted.write_zip(tmp_path / "one_mib.pth", crafted.p_dict(
        {"w": crafted.p_tensor(MIB // 4, 0, (MIB // 4,), (1,))}), {"0": bytes(MIB)})
    assert load_pth(path)["w"].shape == (MIB // 4,)
    with pytest.raises(PthFormatError, match=r"one_mib\.pth: storage record 'archive/data/0' "
                                             r"needs 1048576 bytes, over the 524288-byte cap"):
        load_pth(path, max_bytes=MIB // 2)
    monkeypatch.setenv("DAMO_JAX_PTH_MAX_BYTES", str(MIB // 2))
    with pytest.raises(PthFormatError, match="DAMO_JAX_PTH_MAX_BYTES"):
        read_state_dict(path)
    monkeypatch.setenv("DAMO_JAX_PTH_MAX_BYTES", "lots")
    with pytest.raises(PthFormatError, match=r"DAMO_JAX_PTH_MAX_BYTES='lots'"):
        load_pth(path)


# ----------------------------------------------------------------------------- view geometry
@pytest.mark.parametrize("numel, offset, size, stride, message", [
    (4, 0, (2, 2), (0, 0), None),  # stride 0 within the storage's element count: fine
    (4, 2, (3,), (1,), r"exceeds the storage's 4 elements"),
    (4, 0, (2, 2), (2, -1), r"bad geometry"),
    (4, -1, (2,), (1,), r"bad geometry"),
    (4, 0, (2, 2), (1,), r"bad geometry"),
    (4, 0, (2**62, 2**62), (1, 1), r"declares \d+ elements but the storage holds 4"),
    (4, 0, (5,), (0,), r"declares 5 elements"),
    (4, 2**63, (1,), (1,), r"exceeds"),
    (4, 0, (1, 2), (2**62, 1), None),  # the stride of a size-1 dimension is irrelevant
    (4, 0, (0, 2**40), (1, 1), None),  # empty
    (4, 5, (0,), (1,), r"offset 5 past"),
    (4, 0, (1,) * 33, (1,) * 33, r"at most 32 ints"),
])
def test_view_geometry(tmp_path, numel, offset, size, stride, message):
    values = np.arange(numel, dtype="<f4")
    path = crafted.write_zip(tmp_path / "geom.pth", crafted.p_dict(
        {"w": crafted.p_tensor(numel, offset, size, stride)}), {"0": values.tobytes()})
    if message:
        with pytest.raises(PthFormatError, match=r"geom\.pth: tensor on storage 'archive/data/0'.*"
                           + message):
            load_pth(path)
        return
    got = load_pth(path)["w"]
    want = np.lib.stride_tricks.as_strided(values[offset:], shape=size, strides=[
        (s if n > 1 else 0) * 4 for n, s in zip(size, stride)]) if values[offset:].size else \
        np.zeros(size, np.float32)
    assert got.shape == tuple(size) and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)


def test_contiguous_views_share_storage_and_others_are_copied(tmp_path):
    values = np.arange(12, dtype="<f4")
    pkl = crafted.p_dict({"whole": crafted.p_tensor(12, 0, (3, 4), (4, 1)),
                          "rows": crafted.p_tensor(12, 4, (2, 4), (4, 1)),
                          "t": crafted.p_tensor(12, 0, (4, 3), (1, 4))})
    got = load_pth(crafted.write_zip(tmp_path / "v.pth", pkl, {"0": values.tobytes()}))
    np.testing.assert_array_equal(got["rows"], values.reshape(3, 4)[1:])
    np.testing.assert_array_equal(got["t"], values.reshape(3, 4).T)
    assert np.shares_memory(got["whole"], got["rows"])  # like torch: one storage
    assert not np.shares_memory(got["whole"], got["t"]) and got["t"].flags.c_contiguous


# ----------------------------------------------------------------------------- structure / pickle
@pytest.mark.parametrize("name, build, error, message", [
    ("deep", crafted.legacy_deep, PthFormatError, r"nested deeper than 100 levels"),
    ("tuple", crafted.deep_tuple_key, PthFormatError,
     r"tuples nested deeper than 100 levels in 'archive/data\.pkl'"),
    ("cycle", crafted.cyclic_list, PthFormatError, r"container that holds itself"),
    ("byteorder", crafted.non_utf8_byteorder, PthFormatError,
     r"record 'archive/byteorder' is b'\\xff\\xfe\\xfa', expected 'little' or 'big'"),
    ("build", crafted.ordered_dict_method_build, UnsafeCheckpointError,
     r"refused BUILD \(set state\) of OrderedDict with \{'get': None, 'items': None\}.*"
     r"'archive/data\.pkl'"),
])
def test_hostile_structures(tmp_path, name, build, error, message):
    path = build(tmp_path / f"{name}.pth")
    with pytest.raises(error, match=message) as info:
        load_pth(path)
    assert str(info.value).startswith(f"{path}: ")


def test_opcode_allowance(tmp_path, monkeypatch):
    from damo_jax.interop import pth_unpickle
    path = crafted.write_zip(tmp_path / "ops.pth", b"\x80\x02" + b"N" * 1500 + b".")
    assert load_pth(path) is None  # 1502 opcodes; STOP returns the top of the stack
    monkeypatch.setattr(pth_unpickle, "MAX_OPS", 1000)
    with pytest.raises(PthFormatError, match=r"ops\.pth: more than 1000 pickle opcodes .* in "
                                             r"'archive/data\.pkl'"):
        load_pth(path)


def test_build_positive_control_and_the_one_allowed_build(tmp_path):
    """Plain pickle really lets BUILD replace OrderedDict methods; torch's own BUILD (a state
    dict's ``_metadata``) still loads."""
    path = crafted.ordered_dict_method_build(tmp_path / "b.pth")
    with zipfile.ZipFile(path) as archive:
        assert pickle.loads(archive.read("archive/data.pkl")).items is None
    model = load_pth(FIXTURES / "pth_official.pth")["model"]
    assert type(model) is collections.OrderedDict
    assert model._metadata["backbone.stem.bn"]["version"] == 2
    assert model.items.__self__ is model  # the real method


def test_legacy_storage_count_and_view_bounds(tmp_path):
    tensor = (b"\x80\x02" + crafted.p_tensor(4, 0, (4,), (1,), key="k", storage="LongStorage")
              + b".")
    ok = crafted.write_legacy(tmp_path / "ok.pth", tensor, ["k"],
                              struct.pack("<q", 4) + np.arange(4, dtype="<i8").tobytes())
    np.testing.assert_array_equal(load_pth(ok), [0, 1, 2, 3])
    bad = crafted.write_legacy(tmp_path / "count.pth", tensor, ["k"],
                               struct.pack("<q", 2**60) + np.arange(4, dtype="<i8").tobytes())
    with pytest.raises(PthFormatError, match=r"count\.pth: storage 'k' holds 1152921504606846976 "
                                             "elements but the data pickle declares 4"):
        load_pth(bad)
    view = tensor.replace(b"\x8a\x01\x04tQ", b"\x8a\x01\x04(X\x01\x00\x00\x00v\x8a\x01\x03"
                                             b"\x8a\x01\x04ttQ")  # view of 4 at offset 3
    assert view != tensor
    path = crafted.write_legacy(tmp_path / "view.pth", view, ["k"],
                                struct.pack("<q", 4) + np.arange(4, dtype="<i8").tobytes())
    with pytest.raises(PthFormatError, match=r"view\.pth: storage view 'v' \(offset 3, 4 "
                                             r"elements\) exceeds storage"):
        load_pth(path)


def test_npz_header_is_checked_before_allocating(tmp_path):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (40000, 40000)})
    with zipfile.ZipFile(tmp_path / "w.npz", "w") as archive:
        archive.writestr("w.npy", header.getvalue() + bytes(16))
    with pytest.raises(PthFormatError, match=r"w\.npz: array 'w' declares \(40000, 40000\) x "
                                             "float32 but its record holds"):
        read_state_dict(tmp_path / "w.npz")
    np.savez(tmp_path / "obj.npz", a=np.array([{}], dtype=object))
    with pytest.raises(PthFormatError, match=r"obj\.npz: array 'a'"):
        read_state_dict(tmp_path / "obj.npz")


def test_errors_are_user_errors():
    assert issubclass(PthFormatError, UserError) and issubclass(UnsafeCheckpointError, UserError)
    assert issubclass(UnsafeCheckpointError, pickle.UnpicklingError)
    assert {PthFormatError, UnsafeCheckpointError} <= set(user_error_types())


def test_cli_prints_one_line_for_a_deeply_nested_checkpoint(tmp_path):
    """The issue's 3,000-line RecursionError traceback: now exit 2 and one ``error:`` line."""
    import subprocess
    import sys

    from PIL import Image
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "img.png")
    weights = crafted.legacy_deep(tmp_path / "deep.pth")
    proc = subprocess.run([sys.executable, "-m", "damo_jax", "predict", "--config", "ns", "--weights",
                           str(weights), "--source", str(tmp_path / "img.png"), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout + proc.stderr
    assert lines[0] == f"error: --weights {weights}: containers nested deeper than 100 levels"
