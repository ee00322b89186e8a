"""Bounded ``.npz`` reading for checkpoints (``read_state_dict`` of ``pth_io``).

``np.load`` trusts each ``.npy`` header: a tiny member declaring a (40000, 40000) array makes it
allocate 6 GiB and inflate whatever the member holds. Here every header's shape x itemsize must
equal the member's declared size before anything is allocated, the total goes through the same
byte budget as ``.pth`` files, members are read in bounded chunks and object arrays are refused.
"""
from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np

from damo_jax.interop.pth_bounds import (Budget, PthFormatError, open_member, read_exact,
                                         resolve_max_bytes)


def read_npz(path, *, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """``np.load`` of a ``.npz`` with the same bounds: each ``.npy`` header's shape x itemsize
    must match the member's declared size before anything is allocated."""
    path = Path(path)
    source, budget = str(path), Budget(str(path), resolve_max_bytes(max_bytes))
    try:
        archive = zipfile.ZipFile(path)
    except Exception as exc:
        raise PthFormatError(f"{source}: cannot read .npz ({exc})") from exc
    out = {}
    with archive:
        for info in archive.infolist():
            name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            try:
                with open_member(archive, info, source) as fh:
                    version = np.lib.format.read_magic(fh)
                    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, fortran, dtype = read_header(fh)
                    nbytes = math.prod(shape) * dtype.itemsize
                    if dtype.hasobject or fh.tell() + nbytes != info.file_size:
                        raise PthFormatError(f"{source}: array '{name}' declares {shape} x {dtype} "
                                             f"but its record holds {info.file_size} bytes")
                    budget.take_storage(nbytes, f"array '{name}'")
                    raw = read_exact(fh, nbytes, f"array '{name}'", source)
                out[name] = raw.view(dtype).reshape(shape, order="F" if fortran else "C")
            except (PthFormatError, MemoryError):
                raise
            except Exception as exc:
                raise PthFormatError(f"{source}: corrupt array '{name}' ({exc})") from exc
    return out
