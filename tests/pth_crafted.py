"""Crafted hostile ``.pth`` files for the reader's bounds (issue 10), built on the fly (no binaries).

``python tests/pth_crafted.py [--big]`` builds the four amplification cases of the issue and a few
more, loads each in a fresh subprocess and prints the outcome and the peak RSS (``VmHWM``),
with the peak RSS of the same subprocess before the load as baseline. ``--big`` uses the issue's sizes
(a 2 GiB deflate bomb, a 512 MiB tensor); the default sizes keep it quick.
"""
from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

LEGACY_MAGIC, LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001


# ----------------------------------------------------------------------------- pickle pieces
def p_int(value: int) -> bytes:
    """LONG1: any int, including negative and huge ones."""
    data = pickle.encode_long(value)
    return b"\x8a" + bytes([len(data)]) + data


def p_str(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return b"X" + struct.pack("<I", len(data)) + data


def p_tuple(values) -> bytes:
    return b"(" + b"".join(p_int(v) for v in values) + b"t"


def p_tensor(numel: int, offset: int, size, stride, key: str = "0",
             storage: str = "FloatStorage") -> bytes:
    """``_rebuild_tensor_v2(storage, offset, size, stride, False, None)`` (no PROTO / STOP)."""
    pid = (b"(" + p_str("storage") + b"ctorch\n" + storage.encode() + b"\n" + p_str(key)
           + p_str("cpu") + p_int(numel) + b"tQ")
    return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + p_int(offset) + p_tuple(size)
            + p_tuple(stride) + b"\x89N" + b"tR")


def p_dict(items: dict[str, bytes]) -> bytes:
    """A protocol-2 pickle of ``{name: <object ops>}``."""
    return b"\x80\x02}" + b"".join(p_str(k) + v + b"s" for k, v in items.items()) + b"."


# ----------------------------------------------------------------------------- containers
def write_zip(path: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None,
              byteorder: bytes | None = b"little", compress: bool = False) -> Path:
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", method) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        if byteorder is not None:
            archive.writestr("archive/byteorder", byteorder)
        for key, raw in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", raw)
        archive.writestr("archive/version", b"3\n")
    return path


def write_zip_zeros(path: Path, data_pkl: bytes, key: str, nbytes: int) -> Path:
    """A zip whose storage member ``key`` deflates to ``nbytes`` zero bytes (streamed)."""
    chunk = bytes(1 << 24)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", data_pkl, zipfile.ZIP_STORED)
        archive.writestr("archive/byteorder", b"little", zipfile.ZIP_STORED)
        with archive.open(f"archive/data/{key}", "w", force_zip64=nbytes >= zipfile.ZIP64_LIMIT) as fh:
            for start in range(0, nbytes, len(chunk)):
                fh.write(chunk[:min(len(chunk), nbytes - start)])
    return path


def patch_declared_size(path: Path, name: str, size: int) -> Path:
    """Rewrite the uncompressed size of member ``name`` in the central directory (a lying header)."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    assert info.file_size < 2**32 and info.compress_size < 2**32, "zip64 members not patched"
    central = raw.find(b"PK\x01\x02")
    while central >= 0:
        name_len = struct.unpack_from("<H", raw, central + 28)[0]
        if raw[central + 46:central + 46 + name_len] == name.encode():
            struct.pack_into("<I", raw, central + 24, size)
            struct.pack_into("<I", raw, info.header_offset + 22, size)
            path.write_bytes(bytes(raw))
            return path
        central = raw.find(b"PK\x01\x02", central + 4)
    raise KeyError(name)


def write_legacy(path: Path, data_pickle: bytes, keys=(), raw: bytes = b"") -> Path:
    header = b"".join(pickle.dumps(x, protocol=2) for x in (
        LEGACY_MAGIC, LEGACY_PROTOCOL, {"little_endian": True, "protocol_version": 1001}))
    path.write_bytes(header + data_pickle + pickle.dumps(list(keys), protocol=2) + raw)
    return path


# ----------------------------------------------------------------------------- the cases
def stride0_view(path: Path) -> Path:
    """A (40000, 40000) float32 tensor with stride 0 over a 1-element storage (6 GiB if expanded)."""
    pkl = p_dict({"w": p_tensor(1, 0, (40000, 40000), (0, 0))})
    return write_zip(path, pkl, {"0": struct.pack("<f", 1.0)})


def deflate_bomb(path: Path, nbytes: int) -> Path:
    """A storage declaring 4 elements whose member inflates to ``nbytes`` (header says so)."""
    return write_zip_zeros(path, p_dict({"w": p_tensor(4, 0, (4,), (1,))}), "0", nbytes)


def lying_bomb(path: Path, nbytes: int) -> Path:
    """Same, but the zip header claims the 16 bytes the storage needs: a lying header."""
    deflate_bomb(path, nbytes)
    return patch_declared_size(path, "archive/data/0", 16)


def big_zeros(path: Path, nbytes: int) -> Path:
    """A real ``nbytes`` float32 tensor of zeros, deflated (a 512 MiB tensor is a ~510 KB file)."""
    numel = nbytes // 4
    return write_zip_zeros(path, p_dict({"w": p_tensor(numel, 0, (numel,), (1,))}), "0", nbytes)


def legacy_dag(path: Path, levels: int = 60) -> Path:
    """``L0 = []; L(i+1) = [L(i), L(i)]``: 2**levels leaves when expanded, a few hundred bytes."""
    ops = b"\x80\x02]q\x00"
    for i in range(levels):
        ops += b"](h" + bytes([i]) + b"h" + bytes([i]) + b"eq" + bytes([i + 1])
    return write_legacy(path, ops + b".")


def legacy_deep(path: Path, depth: int = 100_000) -> Path:
    """Lists nested ``depth`` deep (2 bytes per level)."""
    return write_legacy(path, b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b".")


def non_utf8_byteorder(path: Path) -> Path:
    return write_zip(path, p_dict({}), byteorder=b"\xff\xfe\xfa")


def ordered_dict_method_build(path: Path) -> Path:
    """BUILD on an allowed OrderedDict that replaces its ``get`` and ``items`` methods."""
    pkl = (b"\x80\x02ccollections\nOrderedDict\n)R}(" + p_str("get") + b"N" + p_str("items")
           + b"Nu" + b"b.")
    return write_zip(path, pkl)


def deep_tuple_key(path: Path, depth: int = 1_000_000) -> Path:
    """A dict key nested ``depth`` tuples deep (hashing it would recurse in C)."""
    return write_zip(path, b"\x80\x02}N" + b"\x85" * depth + b"Ns.")


def cyclic_list(path: Path) -> Path:
    return write_zip(path, b"\x80\x02]q\x00h\x00a.")


def many_transposed_views(path: Path, side: int = 512, count: int = 2000) -> Path:
    """``count`` transposed (copied) views of one ``side x side`` storage (1 MiB)."""
    numel = side * side
    view = p_tensor(numel, 0, (side, side), (1, side))
    pkl = b"\x80\x02](" + view * count + b"e."
    return write_zip(path, pkl, {"0": bytes(numel * 4)})


def pickle_bomb(path: Path, ops: int = 2_000_000) -> Path:
    """A deflated ``data.pkl`` of ``ops`` EMPTY_LIST opcodes (~64 bytes of memory each)."""
    return write_zip(path, b"\x80\x02" + b"]" * ops + b".", compress=True)


CASES = {  # name -> (builder(path, big) -> path)
    "stride0_40000x40000_view": lambda p, big: stride0_view(p),
    "deflate_bomb_declared": lambda p, big: deflate_bomb(p, (2 << 30) if big else (64 << 20)),
    "deflate_bomb_lying_header": lambda p, big: lying_bomb(p, (1 << 30) if big else (64 << 20)),
    "zeros_512MiB_deflated": lambda p, big: big_zeros(p, (512 << 20) if big else (64 << 20)),
    "legacy_dag_60_levels": lambda p, big: legacy_dag(p),
    "legacy_deep_100000": lambda p, big: legacy_deep(p),
    "non_utf8_byteorder": lambda p, big: non_utf8_byteorder(p),
    "ordered_dict_build": lambda p, big: ordered_dict_method_build(p),
    "deep_tuple_key": lambda p, big: deep_tuple_key(p),
    "cyclic_list": lambda p, big: cyclic_list(p),
    "2000_transposed_views": lambda p, big: many_transposed_views(p),
    "pickle_bomb_2M_lists": lambda p, big: pickle_bomb(p),
}

_PROBE = """
import json, sys
from damo_jax.interop import pth_io

def hwm_mb():  # VmHWM: this process's peak RSS (ru_maxrss would include the parent's, via exec)
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("VmHWM:")) / 1024

before = hwm_mb()
try:
    obj = pth_io.load_pth(sys.argv[1])
    outcome, message = "loaded", type(obj).__name__
except (pth_io.PthFormatError, pth_io.UnsafeCheckpointError) as exc:
    outcome, message = type(exc).__name__, str(exc)
print(json.dumps({"outcome": outcome, "message": message, "baseline_mb": before,
                  "peak_mb": hwm_mb()}))
"""


def probe(path: Path, timeout: float = 300) -> dict:
    """Load ``path`` in a fresh interpreter: outcome, message and peak RSS (MiB) before/after.
    A crash, a traceback or a timeout raises AssertionError with the subprocess's stderr."""
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(path)], capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{path.name}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv) -> None:
    import tempfile
    import time
    big = "--big" in argv
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in CASES.items():
            path = build(Path(tmp) / f"{name}.pth", big)
            start = time.perf_counter()
            result = probe(path)
            print(f"{name:28s} file {path.stat().st_size:>10,d} B  {result['outcome']:22s} "
                  f"peak {result['peak_mb']:7.1f} MiB (baseline {result['baseline_mb']:.1f}) "
                  f"{time.perf_counter() - start:5.1f} s  {result['message'][-110:]}", flush=True)
            path.unlink()


if __name__ == "__main__":
    main(sys.argv[1:])
