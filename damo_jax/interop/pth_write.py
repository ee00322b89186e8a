"""Write PyTorch ``torch.save`` zip checkpoints without torch (re-exported by ``damo_jax.interop.pth_io``).

The file layout mirrors what torch 2.x writes: ``<archive>/data.pkl`` (protocol-2 pickle using
``torch._utils._rebuild_tensor_v2``, ``torch.<X>Storage`` persistent ids and
``collections.OrderedDict``), ``.format_version``, ``.storage_alignment``, ``byteorder``,
``data/<key>`` (raw little-endian elements, each starting on a 64-byte boundary) and ``version``.
``torch.load(path, weights_only=True)`` accepts it (checked with torch 2.13, also with ``mmap=True``).
"""
from __future__ import annotations

import collections
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

__all__ = ["save_pth"]

_ALIGN = 64  # torch aligns every record's data to 64 bytes
_NUMPY_TO_STORAGE = {
    "float32": "FloatStorage", "float64": "DoubleStorage", "float16": "HalfStorage",
    "bfloat16": "BFloat16Storage", "int64": "LongStorage", "int32": "IntStorage",
    "int16": "ShortStorage", "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage",
    "complex64": "ComplexFloatStorage", "complex128": "ComplexDoubleStorage",
}


def is_array_like(value) -> bool:
    return isinstance(value, (np.ndarray, np.generic)) or (
        hasattr(value, "__array__") and hasattr(value, "shape") and hasattr(value, "dtype"))


class _PickleWriter:
    """Protocol-2 pickle of plain data + tensors in the layout ``torch.save`` produces."""

    def __init__(self):
        self.out = bytearray(b"\x80\x02")
        self.storages: list[bytes] = []

    def finish(self) -> bytes:
        return bytes(self.out + b".")

    def global_(self, module: str, name: str) -> None:
        self.out += b"c" + f"{module}\n{name}\n".encode()

    def emit(self, obj, where: str) -> None:
        out = self.out
        if obj is None:
            out += b"N"
        elif isinstance(obj, bool):
            out += b"\x88" if obj else b"\x89"
        elif is_array_like(obj):
            self.tensor(np.asarray(obj), where)
        elif isinstance(obj, int):
            self.int_(obj)
        elif isinstance(obj, float):
            out += b"G" + struct.pack(">d", obj)
        elif isinstance(obj, str):
            data = obj.encode("utf-8", "surrogatepass")
            out += b"X" + struct.pack("<I", len(data)) + data
        elif isinstance(obj, (tuple, list)):
            out += b"(" if isinstance(obj, tuple) else b"](" if obj else b"]"
            for i, item in enumerate(obj):
                self.emit(item, f"{where}[{i}]")
            out += b"t" if isinstance(obj, tuple) else b"e" if obj else b""
        elif isinstance(obj, dict):
            self.dict_(obj, where)
        else:
            raise TypeError(f"save_pth: cannot write {type(obj).__name__} at {where or 'top level'}")

    def int_(self, value: int) -> None:
        if 0 <= value < 256:
            self.out += b"K" + bytes([value])
        elif 0 <= value < 65536:
            self.out += b"M" + struct.pack("<H", value)
        elif -2**31 <= value < 2**31:
            self.out += b"J" + struct.pack("<i", value)
        else:
            data = pickle.encode_long(value)
            self.out += b"\x8a" + bytes([len(data)]) + data

    def dict_(self, obj: dict, where: str) -> None:
        state_dict_like = bool(obj) and all(is_array_like(v) for v in obj.values())
        if isinstance(obj, collections.OrderedDict) or state_dict_like:
            self.global_("collections", "OrderedDict")
            self.out += b")R"
        else:
            self.out += b"}"
        if obj:
            self.out += b"("
            for key, value in obj.items():
                if not isinstance(key, (str, int)):
                    raise TypeError(f"save_pth: dict key {key!r} at {where or 'top level'} "
                                    "must be str or int")
                self.emit(key, where)
                self.emit(value, f"{where}[{key!r}]")
            self.out += b"u"

    def tensor(self, arr: np.ndarray, where: str) -> None:
        storage = _NUMPY_TO_STORAGE.get(arr.dtype.name)
        if storage is None:
            raise TypeError(f"save_pth: dtype {arr.dtype} at {where} has no torch storage type")
        if not arr.flags.c_contiguous:  # (np.ascontiguousarray would turn 0-d into 1-d)
            arr = np.ascontiguousarray(arr)
        if arr.dtype.name == "bfloat16":
            data = arr.view(np.uint16).astype("<u2").tobytes()
        else:
            data = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        key = str(len(self.storages))
        self.storages.append(data)
        strides = tuple(s // arr.itemsize for s in arr.strides) if arr.size else \
            tuple(int(np.prod(arr.shape[i + 1:])) for i in range(arr.ndim))
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.out += b"((X\x07\x00\x00\x00storage"
        self.global_("torch", storage)
        self.emit(key, where)
        self.emit("cpu", where)
        self.int_(arr.size)
        self.out += b"tQ"  # persistent id ('storage', type, key, 'cpu', numel)
        self.int_(0)
        self.emit(tuple(int(n) for n in arr.shape), where)
        self.emit(strides, where)
        self.out += b"\x89"  # requires_grad=False
        self.global_("collections", "OrderedDict")
        self.out += b")Rt" + b"R"  # backward_hooks=OrderedDict(); close args; call


def _aligned_info(name: str, offset: int) -> zipfile.ZipInfo:
    """A stored ZipInfo whose data will start on a 64-byte boundary (as torch writes it)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    pad = -(offset + 30 + len(name.encode()) + 4) % _ALIGN
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    return info


def save_pth(obj, path, *, archive_name: str = "archive") -> None:
    """Write ``obj`` as a zip-format ``torch.save`` file readable by ``torch.load(weights_only=True)``.

    ``obj`` may nest dicts, lists, tuples, str, int, float, bool, None and arrays (numpy, jax,
    ml_dtypes.bfloat16). Each array becomes a contiguous tensor with its own storage; dicts whose
    values are all arrays (state dicts) and OrderedDicts are written as ``collections.OrderedDict``.
    The file is written to a temporary name in the same folder and renamed (atomic).
    """
    writer = _PickleWriter()
    writer.emit(obj, "")
    records = [("data.pkl", writer.finish()), (".format_version", b"1"),
               (".storage_alignment", b"64"), ("byteorder", b"little")]
    records += [(f"data/{i}", data) for i, data in enumerate(writer.storages)]
    records += [("version", b"3\n")]
    path = Path(path)
    # atomic: a crash leaves the old file (or none), never a partial one; open() (not mkstemp,
    # whose files are 0600) so the file gets the umask's permissions like any other output
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            with zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as archive:
                for name, data in records:
                    info = _aligned_info(f"{archive_name}/{name}", fh.tell())
                    archive.writestr(info, data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
