"""Torch-free reading and writing of PyTorch ``torch.save`` checkpoints (SPEC §5.1).

* :func:`load_pth` reads the zip format (``<prefix>/data.pkl``, ``<prefix>/data/<key>``,
  ``<prefix>/byteorder``; the prefix directory varies) and the legacy non-zip format (magic number,
  protocol, sys info, data pickle, storage keys, raw storages). Tensors come back as C-contiguous
  numpy arrays with the tensor's dtype (bfloat16 is widened losslessly to float32); offset, size and
  stride of views are honoured (contiguous views share their storage's memory, like torch).
  Unpickling uses an allow-list (``pth_unpickle``); every size the file declares is checked before
  anything is allocated (``pth_bounds``), and the result is checked to be a plain tree (no cycles,
  at most ``MAX_DEPTH`` levels, at most ``MAX_ELEMENTS`` elements counting shared sub-containers
  once per use: ``pth_unpickle.check_structure``). Every refusal is a :class:`PthFormatError` or :class:`UnsafeCheckpointError`
  naming the file and the record.
* :func:`read_state_dict` returns the network weights ``{name: float32 | int64 array}`` of a
  ``.pth``/``.pt``/``.pkl``/``.npz`` file (``ckpt['model']``, else ``['state_dict']``, else the dict).
* :func:`save_pth` writes a zip-format file that ``torch.load(path, weights_only=True)`` accepts.
"""
from __future__ import annotations

import io
import os
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from damo_jax.interop.pth_bounds import (Budget, PthFormatError, Storage, UnsafeCheckpointError,
                                         decode, open_member, read_exact, resolve_max_bytes,
                                         short)
from damo_jax.interop.npz_io import read_npz
from damo_jax.interop.pth_unpickle import DType, Loader, check_structure
from damo_jax.interop.pth_write import is_array_like, save_pth

__all__ = ["PthFormatError", "UnsafeCheckpointError", "load_pth", "read_state_dict", "save_pth"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
MAX_PICKLE_BYTES = 64 << 20
PICKLE_SLACK, PICKLE_RATIO = 1 << 20, 64  # data.pkl: torch stores it; real pickles deflate < 10x
_TORCH_SUFFIXES = (".pth", ".pt", ".pkl", ".ckpt", ".bin")
_LINE_MAX = 1 << 16


def _storage_id(pid, source: str) -> tuple[DType, str, int]:
    if len(pid) < 5 or not isinstance(pid[1], DType) or not isinstance(pid[2], str) or \
            not isinstance(pid[4], int) or pid[4] < 0:
        raise PthFormatError(f"{source}: malformed storage id {short(pid)}")
    return pid[1], pid[2], pid[4]


# ----------------------------------------------------------------------------- zip format
def _read_member(archive, info, nbytes: int, source: str) -> np.ndarray:
    """Exactly ``nbytes`` of a member (its header already checked), read in bounded chunks."""
    try:
        with open_member(archive, info, source) as fh:
            return read_exact(fh, nbytes, f"record '{info.filename}'", source)
    except (PthFormatError, MemoryError):
        raise
    except Exception as exc:  # CRC, zlib, truncated member
        raise PthFormatError(f"{source}: corrupt record '{info.filename}' ({exc})") from exc


def _load_zip(path: Path, budget: Budget):
    source = str(path)
    try:
        archive = zipfile.ZipFile(path)
    except Exception as exc:
        raise PthFormatError(f"{source}: corrupt or truncated zip archive ({exc})") from exc
    with archive:
        infos = {info.filename: info for info in archive.infolist()}
        candidates = [n[:-len("data.pkl")] for n in infos
                      if n.endswith("/data.pkl") and n.count("/") == 1]
        if not candidates:
            raise PthFormatError(f"{source}: zip archive has no '<prefix>/data.pkl' record "
                                 "(not a torch.save file)")
        first = next(iter(infos)).split("/", 1)[0] + "/"
        prefix = first if first in candidates else candidates[0]

        def member(name: str, max_size: int) -> zipfile.ZipInfo:
            info = infos.get(prefix + name)
            if info is None:
                raise PthFormatError(f"{source}: missing record '{prefix + name}'")
            if info.file_size > max_size:
                raise PthFormatError(f"{source}: record '{info.filename}' declares "
                                     f"{info.file_size} bytes (at most {max_size} expected)")
            return info

        byteorder = "little"
        if prefix + "byteorder" in infos:
            info = member("byteorder", 16)
            raw = _read_member(archive, info, info.file_size, source).tobytes()
            if raw not in (b"little", b"big"):
                raise PthFormatError(f"{source}: record '{info.filename}' is {short(raw)}, "
                                     "expected 'little' or 'big'")
            byteorder = raw.decode()
        storages: dict[str, Storage] = {}

        def load_storage(pid):
            dtype, key, numel = _storage_id(pid, source)
            if key not in storages:
                info = member(f"data/{key}", 2**64)  # size checked against numel just below
                nbytes = numel * dtype.itemsize
                if info.file_size != nbytes:
                    raise PthFormatError(
                        f"{source}: record '{info.filename}' holds {info.file_size} bytes but its "
                        f"storage declares {numel} x {dtype!r} = {nbytes} bytes"
                        + (" (storage is truncated)" if info.file_size < nbytes else ""))
                budget.take_storage(nbytes, f"storage record '{info.filename}'")
                storage = Storage(dtype, info.filename, numel, source)
                raw = _read_member(archive, info, nbytes, source)
                storage.array = decode(raw, dtype, byteorder, budget, f"'{info.filename}'")
                storage.byteorder = byteorder
                storages[key] = storage
            return storages[key]

        info = member("data.pkl", min(MAX_PICKLE_BYTES, budget.max_bytes))
        if info.file_size > PICKLE_SLACK + PICKLE_RATIO * info.compress_size:
            raise PthFormatError(f"{source}: record '{info.filename}' inflates {info.compress_size} "
                                 f"bytes to {info.file_size} (a pickle bomb, not a torch pickle)")
        data = _read_member(archive, info, info.file_size, source).tobytes()
        return Loader(source, budget, load_storage).unpickle(io.BytesIO(data), info.filename,
                                                     info.compress_size)


# ----------------------------------------------------------------------------- legacy format
class _BoundedFile:
    """File reads clamped to the file's size (a declared length never pre-allocates more)."""

    def __init__(self, fh, size: int):
        self.fh, self.size, self.pos = fh, size, 0

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        data = self.fh.read(max(n, 0))
        self.pos += len(data)
        return data

    def readline(self, limit: int = -1) -> bytes:
        line = self.fh.readline(min(_LINE_MAX, self.size - self.pos))
        self.pos += len(line)
        return line

    def seek(self, pos: int) -> None:
        self.fh.seek(pos)
        self.pos = pos


def _no_storage(source: str):
    def refuse(pid):
        raise PthFormatError(f"{source}: storage id {short(pid)} in a legacy header record")
    return refuse


def _load_legacy(path: Path, fh, size: int, budget: Budget):
    source, file = str(path), _BoundedFile(fh, size)
    header = Loader(source, budget, _no_storage(source))
    try:
        magic = header.unpickle(file, "magic number", size)
    except PthFormatError:
        file.seek(0)
        raise PthFormatError(f"{source}: wrong magic {short(file.read(4))} (neither a torch zip "
                             "archive nor a legacy torch.save file)") from None
    if type(magic) is not int or magic != LEGACY_MAGIC:
        raise PthFormatError(f"{source}: wrong magic number {short(magic)} (not a torch.save file)")
    protocol = header.unpickle(file, "protocol version", size)
    if protocol != LEGACY_PROTOCOL:
        raise PthFormatError(f"{source}: unsupported legacy protocol version {short(protocol)}")
    sys_info = header.unpickle(file, "sys info", size)
    little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
    byteorder = "little" if little is not False else "big"
    roots: dict[str, Storage] = {}

    def load_storage(pid):  # pid = ('storage', type, root key, location, numel[, view])
        dtype, key, numel = _storage_id(pid, source)
        root = roots.setdefault(key, Storage(dtype, key, numel, source))
        view = pid[5] if len(pid) > 5 else None
        if view is None:
            return root
        if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str) and
                all(isinstance(v, int) and v >= 0 for v in view[1:])):
            raise PthFormatError(f"{source}: malformed storage view {short(view)} of '{key}'")
        return Storage(root.dtype, view[0], view[2], source, root, view[1])

    data_start = file.pos  # two passes: dtypes of the storages first, tensors once they are read
    Loader(source, budget, load_storage).unpickle(file, "data pickle", size)
    keys = header.unpickle(file, "storage key list", size)
    _read_legacy_storages(file, keys, roots, byteorder, budget, source)
    file.seek(data_start)
    return Loader(source, budget, load_storage).unpickle(file, "data pickle", size)


def _read_legacy_storages(file: _BoundedFile, keys, roots, byteorder, budget, source):
    """Fill ``roots`` from the raw storages: per key an int64 element count, then the elements."""
    if not isinstance(keys, list) or len(set(map(str, keys))) != len(keys):
        raise PthFormatError(f"{source}: legacy storage key list is {short(keys)}")
    for key in keys:
        storage = roots.get(key) if isinstance(key, str) else None
        if storage is None:
            raise PthFormatError(f"{source}: storage {short(key)} listed but never referenced")
        head = file.read(8)
        if len(head) < 8:
            raise PthFormatError(f"{source}: truncated before storage '{key}'")
        count = struct.unpack("<q" if byteorder == "little" else ">q", head)[0]
        if count != storage.numel:
            raise PthFormatError(f"{source}: storage '{key}' holds {count} elements but the data "
                                 f"pickle declares {storage.numel}")
        nbytes = count * storage.dtype.itemsize
        if nbytes > file.size - file.pos:
            raise PthFormatError(f"{source}: storage '{key}' is truncated ({file.size - file.pos} "
                                 f"bytes left, expected {nbytes})")
        budget.take_storage(nbytes, f"storage '{key}'")
        raw = read_exact(file, nbytes, f"storage '{key}'", source)
        storage.array, storage.byteorder = decode(raw, storage.dtype, byteorder, budget,
                                                  f"storage '{key}'"), byteorder
    missing = sorted(k for k, s in roots.items() if s.array is None)
    if missing:
        raise PthFormatError(f"{source}: storages {short(missing)} have no data (file truncated?)")


def load_pth(path, *, max_bytes: int | None = None) -> Any:
    """Load a ``torch.save`` file without torch; tensors become numpy arrays (see module doc).

    ``max_bytes`` caps the tensor data one file may allocate (default ``$DAMO_JAX_PTH_MAX_BYTES``
    or 4 GiB); the proportional checks (declared sizes = stored sizes, views inside storages) are
    always on."""
    path = Path(path)
    budget = Budget(str(path), resolve_max_bytes(max_bytes))
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise PthFormatError(f"{path}: cannot read checkpoint ({exc})") from exc
    with fh:
        size = os.fstat(fh.fileno()).st_size
        is_zip = fh.read(4).startswith(b"PK")
        fh.seek(0)
        obj = _load_zip(path, budget) if is_zip else _load_legacy(path, fh, size, budget)
    check_structure(obj, str(path))
    return obj


def _pick_state_dict(obj, source: str) -> dict:
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                return obj[key]
        if obj and all(is_array_like(v) for v in obj.values()):
            return obj
    raise PthFormatError(f"{source}: no state dict found (expected a dict with 'model' or "
                         f"'state_dict', or a dict of tensors; got {type(obj).__name__}"
                         f"{' with keys ' + short(list(obj)[:8]) if isinstance(obj, dict) else ''})")


def read_state_dict(path, *, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Network weights of a checkpoint: ``{name: array}``, floats as float32, ints/bools as int64.

    Accepts ``.pth``/``.pt``/``.pkl``/``.ckpt``/``.bin`` (torch format) and ``.npz``. Uses
    ``ckpt['model']`` (official files), else ``ckpt['state_dict']``, else the dict itself; a leading
    ``module.`` is stripped. ``max_bytes``: see :func:`load_pth`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        obj = read_npz(path, max_bytes=max_bytes)
    elif suffix in _TORCH_SUFFIXES:
        obj = load_pth(path, max_bytes=max_bytes)
    else:
        raise PthFormatError(f"{path}: unsupported checkpoint extension '{suffix}' "
                             f"(expected .npz or one of {', '.join(_TORCH_SUFFIXES)})")
    state_dict = _pick_state_dict(obj, str(path))
    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str) or not is_array_like(value):
            raise PthFormatError(f"{path}: state dict entry {short(key)} is "
                                 f"{type(value).__name__}, not a tensor")
        name = key[len("module."):] if key.startswith("module.") else key
        if name in out:
            raise PthFormatError(f"{path}: duplicate key '{name}' after stripping 'module.'")
        out[name] = _to_canonical(np.asarray(value), f"{path}: '{key}'")
    return out


def _to_canonical(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype.kind == "f" or arr.dtype.name == "bfloat16":
        return arr.astype(np.float32)
    if arr.dtype.kind in "iub":
        return arr.astype(np.int64)
    raise PthFormatError(f"{what} has unsupported dtype {arr.dtype}")
