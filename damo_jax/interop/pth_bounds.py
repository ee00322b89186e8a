"""Hard bounds for the torch-free checkpoint reader: errors, byte budget, storages, tensor views.

Every byte the reader allocates for tensor data goes through a :class:`Budget` *before* it is
allocated:

* a storage costs ``numel * itemsize`` bytes, which must equal what the file really holds for it
  (the zip header's uncompressed size, the legacy element count); all storages and copies together
  stay under ``max_bytes`` (argument, else ``$DAMO_JAX_PTH_MAX_BYTES``, else 4 GiB);
* a tensor is a *view* (offset, size, stride) of one storage: its extent must lie inside the
  storage and it may not declare more elements than the storage holds (no stride-0 broadcasts);
  C-contiguous views share the storage's memory, other views are copied, and all copies together
  stay under ``2 x storage bytes + 16 MiB``.

So peak memory stays a small multiple of the tensor data the file really contains.
"""
from __future__ import annotations

import math
import os
import pickle
import reprlib

import numpy as np

from damo_jax.errors import UserError

ENV_MAX_BYTES = "DAMO_JAX_PTH_MAX_BYTES"
DEFAULT_MAX_BYTES = 4 << 30
COPY_FACTOR, COPY_SLACK = 2, 16 << 20  # view copies <= COPY_FACTOR * storage bytes + COPY_SLACK
MAX_NDIM = 32
CHUNK = 1 << 20  # bytes per read from a (possibly compressed) zip member

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 60
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 3, 6, 6, 4


class PthFormatError(UserError, ValueError):
    """The file is not a readable torch checkpoint (wrong magic, truncated, out-of-bounds view,
    over the byte budget...); the message names the file and the offending record."""


class UnsafeCheckpointError(pickle.UnpicklingError, UserError):
    """The pickle asked for something outside the allow-list (refused, nothing was called)."""


def short(value) -> str:
    """A bounded repr of file-controlled data for error messages (never raises)."""
    try:
        return _REPR.repr(value)
    except Exception:  # e.g. ints over the str-conversion limit
        return f"<{type(value).__name__}>"


def resolve_max_bytes(max_bytes: int | None) -> int:
    if max_bytes is None:
        env = os.environ.get(ENV_MAX_BYTES, "")
        try:
            max_bytes = int(env) if env else DEFAULT_MAX_BYTES
        except ValueError:
            raise PthFormatError(f"${ENV_MAX_BYTES}={env!r} is not an integer byte count") from None
    if max_bytes <= 0:
        raise PthFormatError(f"max_bytes must be positive, got {max_bytes}")
    return int(max_bytes)


class Budget:
    """Running count of the bytes one load allocates for tensor data (see module doc)."""

    def __init__(self, source: str, max_bytes: int):
        self.source, self.max_bytes = source, max_bytes
        self.storage_bytes = self.copy_bytes = 0

    def _total(self, nbytes: int, what: str) -> None:
        if self.storage_bytes + self.copy_bytes + nbytes > self.max_bytes:
            raise PthFormatError(
                f"{self.source}: {what} needs {nbytes} bytes, over the {self.max_bytes}-byte cap "
                f"for one checkpoint (raise it with max_bytes= or ${ENV_MAX_BYTES})")

    def take_storage(self, nbytes: int, what: str) -> None:
        self._total(nbytes, what)
        self.storage_bytes += nbytes

    def take_copy(self, nbytes: int, what: str) -> None:
        self._total(nbytes, what)
        if self.copy_bytes + nbytes > COPY_FACTOR * self.storage_bytes + COPY_SLACK:
            raise PthFormatError(
                f"{self.source}: {what} would copy {self.copy_bytes + nbytes} bytes of views out "
                f"of {self.storage_bytes} bytes of storage data (views re-reading the same "
                "storage many times)")
        self.copy_bytes += nbytes


class DType:
    """Stand-in for a torch storage class or torch dtype: the element layout only."""

    def __init__(self, name: str, code: str):
        self.name, self.code = name, code
        self.itemsize = 2 if code == "bf16" else np.dtype(code).itemsize

    def numpy(self, byteorder: str) -> np.dtype:
        code = "<u2" if self.code == "bf16" else self.code
        return np.dtype(code).newbyteorder("<" if byteorder == "little" else ">")

    def __repr__(self):
        return f"torch.{self.name}"


def read_exact(fh, nbytes: int, what: str, source: str) -> np.ndarray:
    """``nbytes`` from ``fh`` into a new uint8 array, in bounded chunks (a compressed member
    never inflates past ``nbytes``); fewer bytes -> :class:`PthFormatError`."""
    buf = np.empty(nbytes, np.uint8)
    view, pos = memoryview(buf), 0
    while pos < nbytes:
        data = fh.read(min(CHUNK, nbytes - pos))
        if not data:
            raise PthFormatError(f"{source}: {what} is truncated ({pos} bytes, expected {nbytes})")
        view[pos:pos + len(data)] = data
        pos += len(data)
    return buf


def open_member(archive, info, source: str):
    """``archive.open(info)``; a bad local header, unsupported compression or encryption ->
    :class:`PthFormatError` naming the record."""
    try:
        return archive.open(info)
    except Exception as exc:
        raise PthFormatError(f"{source}: corrupt record '{info.filename}' ({exc})") from exc


def decode(raw: np.ndarray, dtype: DType, byteorder: str, budget: Budget, what: str) -> np.ndarray:
    """uint8 bytes -> 1-D elements in native byte order, in place where possible; bfloat16 is
    widened to float32 (a counted copy)."""
    arr = raw.view(dtype.numpy(byteorder))
    if not arr.dtype.isnative:
        arr.byteswap(inplace=True)
        arr = arr.view(arr.dtype.newbyteorder("="))
    if dtype.code == "bf16":
        budget.take_copy(arr.size * 4, f"widening bfloat16 {what}")
        wide = arr.astype(np.uint32)
        wide <<= 16
        arr = wide.view(np.float32)
    return arr


class Storage:
    """A torch storage: ``numel`` elements of ``dtype``, ``array`` (1-D, native) once read.

    ``root``/``start``: a legacy-format storage view (elements ``start:start+numel`` of root)."""

    def __init__(self, dtype: DType, record: str, numel: int, source: str, root=None, start=0):
        self.dtype, self.record, self.numel, self.source = dtype, record, numel, source
        self.root, self.start, self.array, self.byteorder = root, start, None, "little"
        self._typed: dict[str, np.ndarray] = {}

    @property
    def ready(self) -> bool:
        return (self.root or self).array is not None

    def elements(self) -> np.ndarray:
        if self.root is None:
            return self.array
        base = self.root.array
        if not (0 <= self.start and self.start + self.numel <= base.size):
            raise PthFormatError(f"{self.source}: storage view '{self.record}' (offset "
                                 f"{self.start}, {self.numel} elements) exceeds storage "
                                 f"'{self.root.record}' of {base.size} elements")
        return base[self.start:self.start + self.numel]

    def typed(self, dtype: DType | None, budget: Budget) -> np.ndarray:
        """The elements as ``dtype`` (``_rebuild_tensor_v3`` on an untyped byte storage)."""
        elements = self.elements()
        if dtype is None or dtype.code == self.dtype.code:
            return elements
        if self.dtype.code != "u1":
            raise PthFormatError(f"{self.source}: tensor of dtype {dtype!r} on storage "
                                 f"'{self.record}' of type {self.dtype!r}")
        if dtype.code not in self._typed:
            count = elements.size // dtype.itemsize * dtype.itemsize
            raw = elements[:count]
            if not dtype.numpy(self.root_byteorder()).isnative:  # decode swaps in place
                budget.take_copy(count, f"re-typing storage '{self.record}'")
                raw = raw.copy()
            self._typed[dtype.code] = decode(raw, dtype, self.root_byteorder(), budget,
                                             f"storage '{self.record}'")
        return self._typed[dtype.code]

    def root_byteorder(self) -> str:
        return (self.root or self).byteorder


def int_tuple(value, what: str, where: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > MAX_NDIM or \
            not all(isinstance(v, int) for v in value):
        raise PthFormatError(f"{where}: tensor {what} must be a tuple of at most {MAX_NDIM} ints, "
                             f"got {short(value)}")
    return tuple(int(v) for v in value)


def build_view(storage: Storage, offset, size, stride, dtype: DType | None,
               budget: Budget) -> np.ndarray:
    """The tensor ``storage[offset + sum(i_k * stride_k)]`` of shape ``size`` (numpy, C order).

    Refuses (PthFormatError naming file and storage record) any geometry that is not a plain view
    inside the storage: negative values, rank mismatch, more elements than the storage holds,
    extent past its end."""
    where = f"{storage.source}: tensor on storage '{storage.record}'"
    size, stride = int_tuple(size, "size", where), int_tuple(stride, "stride", where)
    elements = storage.typed(dtype, budget)
    if not isinstance(offset, int) or len(size) != len(stride) or offset < 0 or \
            min(size + stride, default=0) < 0:
        raise PthFormatError(f"{where}: bad geometry offset={short(offset)} size={short(size)} "
                             f"stride={short(stride)}")
    numel, capacity = math.prod(size), elements.size

    def geometry() -> str:
        return f"(offset={offset}, size={short(size)}, stride={short(stride)})"

    if numel == 0:
        if offset > capacity:
            raise PthFormatError(f"{where}: offset {offset} past the storage's {capacity} elements")
        try:
            return np.zeros(size, elements.dtype)
        except ValueError as exc:
            raise PthFormatError(f"{where}: bad empty tensor size {short(size)} ({exc})") from None
    if numel > capacity:
        raise PthFormatError(f"{where}: {geometry()} declares {numel} elements but the storage holds "
                             f"{capacity} (broadcast / overlapping views are not supported)")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= capacity:
        raise PthFormatError(f"{where}: {geometry()} exceeds the storage's {capacity} elements")
    stride = tuple(0 if n == 1 else s for n, s in zip(size, stride))
    contiguous = tuple(0 if n == 1 else math.prod(size[i + 1:]) for i, n in enumerate(size))
    if stride == contiguous:  # shares the storage's memory (like torch)
        return elements[offset:offset + numel].reshape(size)
    budget.take_copy(numel * elements.itemsize, f"tensor view {geometry()} of '{storage.record}'")
    view = np.lib.stride_tricks.as_strided(
        elements[offset:], shape=size, strides=tuple(s * elements.itemsize for s in stride),
        writeable=False)
    return np.array(view, order="C")
