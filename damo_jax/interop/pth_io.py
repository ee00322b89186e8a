"""Torch-free reading and writing of PyTorch ``torch.save`` checkpoints (SPEC §5.1).

* :func:`load_pth` reads the zip format (``<prefix>/data.pkl``, ``<prefix>/data/<key>``,
  ``<prefix>/byteorder``; the prefix directory varies) and the legacy non-zip format (magic number,
  protocol, sys info, data pickle, storage keys, raw storages). Tensors come back as C-contiguous
  numpy arrays with the tensor's dtype (bfloat16 is widened losslessly to float32); offset, size and
  stride of views are honoured. Unpickling uses an allow-list: only the torch globals needed to rebuild
  tensors are resolved, each to a local side-effect-free function; any other global raises
  :class:`UnsafeCheckpointError` before anything is called.
* :func:`read_state_dict` returns the network weights ``{name: float32 | int64 array}`` of a
  ``.pth``/``.pt``/``.pkl``/``.npz`` file (``ckpt['model']``, else ``['state_dict']``, else the dict).
* :func:`save_pth` writes a zip-format file that ``torch.load(path, weights_only=True)`` accepts.
"""
from __future__ import annotations

import collections
import io
import pickle
import pickletools
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from damo_jax.interop.pth_write import is_array_like, save_pth

__all__ = ["PthFormatError", "UnsafeCheckpointError", "load_pth", "read_state_dict", "save_pth"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
_TORCH_SUFFIXES = (".pth", ".pt", ".pkl", ".ckpt", ".bin")

# torch storage class name -> element dtype (little endian; "bf16" is decoded to float32)
_STORAGE_DTYPES = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "BFloat16Storage": "bf16",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?", "ComplexFloatStorage": "<c8",
    "ComplexDoubleStorage": "<c16", "UntypedStorage": "u1",
}
# torch dtype name -> element dtype (used by _rebuild_tensor_v3 on untyped byte storages)
_TORCH_DTYPES = {
    "float32": "<f4", "float": "<f4", "float64": "<f8", "double": "<f8", "float16": "<f2",
    "half": "<f2", "bfloat16": "bf16", "int64": "<i8", "long": "<i8", "int32": "<i4", "int": "<i4",
    "int16": "<i2", "short": "<i2", "int8": "i1", "uint8": "u1", "bool": "?", "uint16": "<u2",
    "uint32": "<u4", "uint64": "<u8", "complex64": "<c8", "complex128": "<c16",
}


class PthFormatError(ValueError):
    """The file is not a readable torch checkpoint (wrong magic, truncated, missing records...)."""


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The pickle asked for a global outside the allow-list (it was refused, nothing was called)."""


class _Sealed:
    """Objects handed to the pickle: refuse BUILD (``__setstate__``) so a pickle cannot mutate them."""

    def __setstate__(self, state):
        raise UnsafeCheckpointError(f"BUILD on {type(self).__name__} refused")


class _DType(_Sealed):
    """Stand-in for a torch storage class or torch dtype: the element layout only."""

    def __init__(self, name: str, code: str):
        self.name, self.code = name, code

    def numpy(self, byteorder: str) -> np.dtype:
        code = "<u2" if self.code == "bf16" else self.code
        return np.dtype(code).newbyteorder("<" if byteorder == "little" else ">")


class _Callable(_Sealed):
    """Allow-listed callable handed to the pickle; sealed so BUILD cannot alter the function."""

    def __init__(self, fn):
        self._fn = fn

    def __call__(self, *args):
        return self._fn(*args)

    def __repr__(self):
        return f"<allowed {self._fn.__name__}>"


class _TensorType(_Sealed):
    """Stand-in for ``torch.Tensor`` / ``torch.nn.Parameter`` (only used as a marker)."""


class _Storage(_Sealed):
    """A torch storage: 1-D elements, filled now (zip) or after the data pickle (legacy)."""

    def __init__(self, dtype: _DType, key: str, numel: int, source: str, root=None, start=0):
        self.dtype, self.key, self.numel, self.source = dtype, key, numel, source
        self.root, self.start, self.array, self.byteorder = root, start, None, "little"

    def elements(self) -> np.ndarray | None:
        if self.root is not None:
            base = self.root.elements()
            return None if base is None else base[self.start:self.start + self.numel]
        return self.array

    def fill(self, raw: bytes, byteorder: str) -> None:
        nbytes = self.numel * self.dtype.numpy(byteorder).itemsize
        if len(raw) < nbytes:
            raise PthFormatError(f"{self.source}: storage '{self.key}' is truncated "
                                 f"({len(raw)} bytes, expected {nbytes})")
        self.array, self.byteorder = _decode(raw, self.dtype, byteorder, self.numel), byteorder


def _decode(raw, dtype: _DType, byteorder: str, count: int = -1) -> np.ndarray:
    """Elements of ``raw`` (bytes or a uint8 array) in native byte order; bfloat16 -> float32."""
    arr = np.frombuffer(raw, dtype.numpy(byteorder), count=count)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if dtype.code == "bf16":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr


class _PendingTensor:
    """A tensor whose storage has not been read yet (legacy format); resolved after loading."""

    def __init__(self, args):
        self.args = args


def _int_tuple(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) for v in value):
        raise PthFormatError(f"tensor {what} must be a tuple of ints, got {value!r}")
    return tuple(int(v) for v in value)


def _build_tensor(storage, storage_offset, size, stride, dtype: _DType | None = None):
    if not isinstance(storage, _Storage):
        raise UnsafeCheckpointError(f"tensor rebuild got {type(storage).__name__}, not a storage")
    if storage.elements() is None:
        return _PendingTensor((storage, storage_offset, size, stride, dtype))
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    elements = storage.elements()
    if dtype is not None:  # v3: untyped byte storage reinterpreted as `dtype`
        root = storage.root if storage.root is not None else storage
        elements = _decode(np.ascontiguousarray(elements), dtype, root.byteorder)
    if len(size) != len(stride) or min(size + stride, default=0) < 0 or \
            not isinstance(storage_offset, int) or storage_offset < 0:
        raise PthFormatError(f"{storage.source}: bad tensor geometry offset={storage_offset} "
                             f"size={size} stride={stride} on storage '{storage.key}'")
    if 0 in size:
        return np.zeros(size, elements.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= elements.size:
        raise PthFormatError(f"{storage.source}: tensor (offset={storage_offset}, size={size}, "
                             f"stride={stride}) exceeds storage '{storage.key}' of "
                             f"{elements.size} elements")
    view = np.lib.stride_tricks.as_strided(
        elements[storage_offset:], shape=size,
        strides=tuple(s * elements.itemsize for s in stride), writeable=False)
    return np.array(view, order="C")


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _build_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _build_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
    if not isinstance(dtype, _DType):
        raise UnsafeCheckpointError(f"_rebuild_tensor_v3 got dtype {dtype!r}")
    return _build_tensor(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, (np.ndarray, _PendingTensor)):
        raise UnsafeCheckpointError(f"_rebuild_parameter got {type(data).__name__}")
    return data


_REBUILDERS = {name: _Callable(fn) for name, fn in [
    ("_rebuild_tensor", _rebuild_tensor), ("_rebuild_tensor_v2", _rebuild_tensor_v2),
    ("_rebuild_tensor_v3", _rebuild_tensor_v3), ("_rebuild_parameter", _rebuild_parameter),
    ("_rebuild_parameter_with_state", _rebuild_parameter)]}


def _rebuild_from_type_v2(func, new_type, args, state):
    if not any(func is f for f in _REBUILDERS.values()) or \
            not isinstance(new_type, _TensorType) or not isinstance(args, tuple):
        raise UnsafeCheckpointError(f"_rebuild_from_type_v2({func!r}, {new_type!r}) refused")
    return func(*args)


def _torch_size(dims=()):
    return _int_tuple(dims, "torch.Size")


def _torch_device(kind, index=None):
    if not isinstance(kind, str) or not (index is None or isinstance(index, int)):
        raise UnsafeCheckpointError(f"torch.device({kind!r}, {index!r}) refused")
    return kind if index is None else f"{kind}:{index}"


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,  # immutable C types: BUILD fails
    **{(module, t.__name__): t for module in ("builtins", "__builtin__")  # (py2 name: protocol 2)
       for t in (set, frozenset, complex)},
    **{("torch._utils", name): fn for name, fn in _REBUILDERS.items()},
    ("torch._tensor", "_rebuild_from_type_v2"): _Callable(_rebuild_from_type_v2),
    ("torch", "Size"): _Callable(_torch_size), ("torch", "device"): _Callable(_torch_device),
    ("torch", "Tensor"): _TensorType(), ("torch.nn.parameter", "Parameter"): _TensorType(),
}
for _module in ("torch", "torch.cuda", "torch.storage"):
    _SAFE_GLOBALS.update({(_module, n): _DType(n, c) for n, c in _STORAGE_DTYPES.items()})
_SAFE_GLOBALS.update({("torch", n): _DType(n, c) for n, c in _TORCH_DTYPES.items()})


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals; storages come from ``load_storage``."""

    def __init__(self, file, source: str, load_storage=None):
        super().__init__(file)
        self._source, self._load_storage = source, load_storage

    def find_class(self, module, name):
        try:
            return _SAFE_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise UnsafeCheckpointError(
                f"{self._source}: refused to load global '{module}.{name}' "
                "(not needed to rebuild tensors; the file may be malicious)") from None

    def persistent_load(self, pid):
        if self._load_storage is None or not isinstance(pid, tuple) or not pid or \
                pid[0] != "storage":
            raise UnsafeCheckpointError(f"{self._source}: unsupported persistent id {pid!r}")
        return self._load_storage(pid)


def _check_storage_pid(pid, source: str):
    if len(pid) < 5 or not isinstance(pid[1], _DType) or not isinstance(pid[2], str) or \
            not isinstance(pid[4], int) or pid[4] < 0:
        raise PthFormatError(f"{source}: malformed storage id {pid!r}")
    return pid[1], pid[2], pid[4]


def _unpickle(data: bytes | io.BytesIO, source: str, load_storage=None):
    file = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        return _RestrictedUnpickler(file, source, load_storage).load()
    except UnsafeCheckpointError as exc:
        if str(exc).startswith(source):
            raise
        raise UnsafeCheckpointError(f"{source}: {exc}") from exc
    except PthFormatError:
        raise
    except Exception as exc:  # truncated / corrupt pickle, bad arguments to an allowed callable
        raise PthFormatError(f"{source}: corrupt pickle ({type(exc).__name__}: {exc})") from exc


def _load_zip(path: Path):
    source = str(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise PthFormatError(f"{source}: corrupt or truncated zip archive ({exc})") from exc
    with archive:
        names = archive.namelist()
        candidates = [n[:-len("data.pkl")] for n in names
                      if n.endswith("/data.pkl") and n.count("/") == 1]
        if not candidates:
            raise PthFormatError(f"{source}: zip archive has no '<prefix>/data.pkl' record "
                                 "(not a torch.save file)")
        first = names[0].split("/", 1)[0] + "/"
        prefix = first if first in candidates else candidates[0]

        def read(name: str) -> bytes:
            try:
                return archive.read(prefix + name)
            except KeyError:
                raise PthFormatError(f"{source}: missing record '{prefix + name}'") from None
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise PthFormatError(f"{source}: corrupt record '{prefix + name}' ({exc})") from exc

        byteorder = read("byteorder").decode() if prefix + "byteorder" in names else "little"
        if byteorder not in ("little", "big"):
            raise PthFormatError(f"{source}: unknown byteorder {byteorder!r}")
        storages: dict[str, _Storage] = {}

        def load_storage(pid):
            dtype, key, numel = _check_storage_pid(pid, source)
            if key not in storages:
                storages[key] = _Storage(dtype, key, numel, source)
                storages[key].fill(read(f"data/{key}"), byteorder)
            return storages[key]

        return _unpickle(read("data.pkl"), source, load_storage)


def _pickle_end(raw: bytes, start: int, source: str) -> int:
    """Offset just past the pickle starting at ``start`` (parsed, never executed)."""
    try:
        for opcode, _, pos in pickletools.genops(io.BytesIO(raw[start:])):
            if opcode.name == "STOP":
                return start + pos + 1
    except Exception as exc:
        raise PthFormatError(f"{source}: corrupt legacy data pickle ({exc})") from exc
    raise PthFormatError(f"{source}: legacy data pickle has no STOP opcode")


def _resolve(obj):
    """Replace :class:`_PendingTensor` placeholders inside containers by arrays."""
    if isinstance(obj, _PendingTensor):
        return _build_tensor(*obj.args[:4], obj.args[4])
    if isinstance(obj, dict):
        return type(obj)((k, _resolve(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v) for v in obj)
    return obj


def _load_legacy(path: Path, raw: bytes):
    source = str(path)
    try:
        magic_end = _pickle_end(raw, 0, source)
    except PthFormatError:
        raise PthFormatError(f"{source}: wrong magic {raw[:4]!r} (neither a torch zip archive nor "
                             "a legacy torch.save file)") from None
    if _unpickle(raw[:magic_end], source) != LEGACY_MAGIC:
        raise PthFormatError(f"{source}: wrong magic number (not a torch.save file)")
    ends = [magic_end]
    for _ in range(4):  # protocol, sys_info, data, storage keys
        ends.append(_pickle_end(raw, ends[-1], source))
    protocol = _unpickle(raw[ends[0]:ends[1]], source)
    if protocol != LEGACY_PROTOCOL:
        raise PthFormatError(f"{source}: unsupported legacy protocol version {protocol!r}")
    sys_info = _unpickle(raw[ends[1]:ends[2]], source)
    keys = _unpickle(raw[ends[3]:ends[4]], source)
    little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
    byteorder = "little" if little else "big"
    roots: dict[str, _Storage] = {}

    def load_storage(pid):
        dtype, key, numel = _check_storage_pid(pid, source)
        root = roots.setdefault(key, _Storage(dtype, key, numel, source))
        view = pid[5] if len(pid) > 5 else None
        if view is None:
            return root
        view_key, offset, view_size = view
        return _Storage(dtype, view_key, view_size, source, root=root, start=offset)

    obj = _unpickle(raw[ends[2]:ends[3]], source, load_storage)
    _read_legacy_storages(raw, ends[4], keys, roots, byteorder, source)
    try:
        return _resolve(obj)
    except PthFormatError:
        raise
    except (ValueError, TypeError) as exc:
        raise PthFormatError(f"{source}: bad tensor in legacy file ({exc})") from exc


def _read_legacy_storages(raw, pos, keys, roots, byteorder, source):
    """Fill ``roots`` from the raw storages: per key an int64 element count, then the elements."""
    if not isinstance(keys, list):
        raise PthFormatError(f"{source}: legacy storage key list is {type(keys).__name__}")
    for key in keys:
        if key not in roots:
            raise PthFormatError(f"{source}: storage '{key}' listed but never referenced")
        storage = roots[key]
        head = raw[pos:pos + 8]
        if len(head) < 8:
            raise PthFormatError(f"{source}: truncated before storage '{key}'")
        count = struct.unpack("<q" if byteorder == "little" else ">q", head)[0]
        if count < 0:
            raise PthFormatError(f"{source}: negative size for storage '{key}'")
        nbytes = count * storage.dtype.numpy(byteorder).itemsize
        storage.numel = count
        storage.fill(raw[pos + 8:pos + 8 + nbytes], byteorder)
        pos += 8 + nbytes
    missing = sorted(k for k, s in roots.items() if s.array is None)
    if missing:
        raise PthFormatError(f"{source}: storages {missing} have no data (file truncated?)")


def load_pth(path) -> Any:
    """Load a ``torch.save`` file without torch; tensors become numpy arrays (see module doc)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise PthFormatError(f"{path}: cannot read checkpoint ({exc})") from exc
    if head.startswith(b"PK"):
        return _load_zip(path)
    return _load_legacy(path, path.read_bytes())  # starts with the pickled magic number


def _pick_state_dict(obj, source: str) -> dict:
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                return obj[key]
        if obj and all(is_array_like(v) for v in obj.values()):
            return obj
    raise PthFormatError(f"{source}: no state dict found (expected a dict with 'model' or "
                         f"'state_dict', or a dict of tensors; got {type(obj).__name__}"
                         f"{' with keys ' + str(list(obj)[:8]) if isinstance(obj, dict) else ''})")


def read_state_dict(path) -> dict[str, np.ndarray]:
    """Network weights of a checkpoint: ``{name: array}``, floats as float32, ints/bools as int64.

    Accepts ``.pth``/``.pt``/``.pkl``/``.ckpt``/``.bin`` (torch format) and ``.npz``. Uses ``ckpt['model']`` (official
    files), else ``ckpt['state_dict']``, else the dict itself; a leading ``module.`` is stripped.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                obj = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise PthFormatError(f"{path}: cannot read .npz ({exc})") from exc
    elif suffix in _TORCH_SUFFIXES:
        obj = load_pth(path)
    else:
        raise PthFormatError(f"{path}: unsupported checkpoint extension '{suffix}' "
                             f"(expected .npz or one of {', '.join(_TORCH_SUFFIXES)})")
    state_dict = _pick_state_dict(obj, str(path))
    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str) or not is_array_like(value):
            raise PthFormatError(f"{path}: state dict entry {key!r} is {type(value).__name__}, "
                                 "not a tensor")
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
