"""The allow-list unpickler of the torch-free checkpoint reader (used by ``pth_io``).

Built on the pure-Python ``pickle._Unpickler`` so every opcode is under our control:

* ``find_class`` resolves only the torch globals needed to rebuild tensors, each to a local
  side-effect-free stand-in; any other global raises :class:`UnsafeCheckpointError` before
  anything is called;
* ``BUILD`` (``__setstate__``) is refused on everything except the one use real ``torch.save``
  files make of it: setting ``_metadata`` (a dict of ``{module prefix: {str: scalar}}``) on a
  state-dict ``OrderedDict``; so a pickle can never replace a method of an allowed object;
* at most ``ops_allowance(stored bytes)`` opcodes run (each opcode makes at most one small object,
  so a tiny file that inflates to a huge pickle cannot build millions of them), tuples nest at most ``MAX_TUPLE_DEPTH`` deep (hashing a deeper
  tuple would recurse in C), and the protocol-5 opcodes that pre-allocate a declared length
  (``BYTEARRAY8``, out-of-band buffers) are refused;
* any other failure inside the pickle becomes :class:`PthFormatError` naming file and record;
* :func:`check_structure` then refuses cycles, deep nesting and DAGs that expand exponentially.
"""
from __future__ import annotations

import collections
import pickle
from typing import Any, Callable

import numpy as np

from damo_jax.interop.pth_bounds import (Budget, DType, PthFormatError, Storage,
                                         UnsafeCheckpointError, build_view, int_tuple, short)

MAX_OPS = 2_000_000  # ~40 opcodes per tensor in torch files: room for ~50k tensors
BASE_OPS, OPS_PER_STORED_BYTE = 65_536, 2  # torch pickles: ~1 opcode per 6 bytes
MAX_TUPLE_DEPTH = 100
MAX_DEPTH = 100  # containers in the loaded object (check_structure)
MAX_ELEMENTS = 10_000_000  # elements of the loaded object, a shared container once per use

# torch storage class name -> element dtype (little endian; "bf16" is decoded to float32)
STORAGE_DTYPES = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "BFloat16Storage": "bf16",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?", "ComplexFloatStorage": "<c8",
    "ComplexDoubleStorage": "<c16", "UntypedStorage": "u1",
}
# torch dtype name -> element dtype (used by _rebuild_tensor_v3 on untyped byte storages)
TORCH_DTYPES = {
    "float32": "<f4", "float": "<f4", "float64": "<f8", "double": "<f8", "float16": "<f2",
    "half": "<f2", "bfloat16": "bf16", "int64": "<i8", "long": "<i8", "int32": "<i4", "int": "<i4",
    "int16": "<i2", "short": "<i2", "int8": "i1", "uint8": "u1", "bool": "?", "uint16": "<u2",
    "uint32": "<u4", "uint64": "<u8", "complex64": "<c8", "complex128": "<c16",
}
_DTYPE_GLOBALS = {
    **{(m, n): DType(n, c) for m in ("torch", "torch.cuda", "torch.storage")
       for n, c in STORAGE_DTYPES.items()},
    **{("torch", n): DType(n, c) for n, c in TORCH_DTYPES.items()},
}


def _children(obj):
    if isinstance(obj, dict):
        return iter([*obj.keys(), *obj.values()])
    if isinstance(obj, (list, tuple, set, frozenset)):
        return iter(obj)
    return None


def check_structure(root, source: str, max_depth: int = MAX_DEPTH,
                    max_elements: int = MAX_ELEMENTS) -> None:
    """Refuse cycles, nesting deeper than ``max_depth`` and trees of more than ``max_elements``
    elements (a shared sub-container counts once per use: a DAG of shared lists would expand
    exponentially in any code that walks it). Iterative, memoised by object identity."""
    if _children(root) is None:
        return
    done: dict[int, int] = {}
    on_path = {id(root)}
    stack: list[list] = [[root, _children(root), 1]]

    def add(frame, count):
        frame[2] += count
        if frame[2] > max_elements:
            raise PthFormatError(f"{source}: the checkpoint expands to more than {max_elements} "
                                 "elements (shared sub-containers)")

    while stack:
        frame = stack[-1]
        child = next(frame[1], stack)  # `stack` doubles as the end-of-children sentinel
        if child is stack:
            stack.pop()
            on_path.discard(id(frame[0]))
            done[id(frame[0])] = frame[2]
            if stack:
                add(stack[-1], frame[2])
            continue
        kids = _children(child)
        if kids is None:
            add(frame, 1)
        elif id(child) in done:
            add(frame, done[id(child)])
        elif id(child) in on_path:
            raise PthFormatError(f"{source}: the checkpoint contains a container that holds itself")
        elif len(stack) >= max_depth:
            raise PthFormatError(f"{source}: containers nested deeper than {max_depth} levels")
        else:
            on_path.add(id(child))
            stack.append([child, kids, 1])


class Pending:
    """A tensor whose storage is not read yet (first pass over a legacy-format data pickle)."""


class Allowed:
    """An allow-listed callable handed to the pickle (BUILD on it is refused like on all else)."""

    def __init__(self, name: str, fn: Callable):
        self.name, self._fn = name, fn

    def __call__(self, *args):
        return self._fn(*args)

    def __repr__(self):
        return f"<allowed {self.name}>"


class TensorType:
    """Stand-in for ``torch.Tensor`` / ``torch.nn.Parameter`` (only used as a marker)."""


def _is_module_metadata(state) -> bool:
    """``{'_metadata': {prefix: {key: scalar}}}``: what torch BUILDs on a state-dict OrderedDict."""
    if type(state) is not dict or list(state) != ["_metadata"] or \
            not isinstance(state["_metadata"], dict):
        return False
    scalar = (int, float, str, bool, type(None))
    return all(isinstance(k, str) and type(v) is dict and
               all(isinstance(a, str) and isinstance(b, scalar) for a, b in v.items())
               for k, v in state["_metadata"].items())


class Loader:
    """One load: the file name, the byte budget, and how persistent storage ids are resolved."""

    def __init__(self, source: str, budget: Budget, load_storage: Callable[[tuple], Storage]):
        self.source, self.budget, self._load_storage = source, budget, load_storage
        rebuilders = {name: Allowed(name, fn) for name, fn in [
            ("_rebuild_tensor", self._rebuild_tensor), ("_rebuild_tensor_v2", self._rebuild_tensor),
            ("_rebuild_tensor_v3", self._rebuild_tensor_v3),
            ("_rebuild_parameter", self._rebuild_parameter),
            ("_rebuild_parameter_with_state", self._rebuild_parameter)]}
        self._rebuilders = set(map(id, rebuilders.values()))
        self.globals: dict[tuple[str, str], Any] = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            **{(module, t.__name__): t for module in ("builtins", "__builtin__")
               for t in (set, frozenset, complex)},
            **{("torch._utils", name): fn for name, fn in rebuilders.items()},
            ("torch._tensor", "_rebuild_from_type_v2"):
                Allowed("_rebuild_from_type_v2", self._rebuild_from_type_v2),
            ("torch", "Size"): Allowed("Size", self._torch_size),
            ("torch", "device"): Allowed("device", self._torch_device),
            ("torch", "Tensor"): TensorType(), ("torch.nn.parameter", "Parameter"): TensorType(),
            **_DTYPE_GLOBALS,
        }

    # ---------------------------------------------------------------- allow-listed callables
    def _tensor(self, storage, offset, size, stride, dtype=None):
        if not isinstance(storage, Storage):
            raise UnsafeCheckpointError(f"{self.source}: tensor rebuild got "
                                        f"{type(storage).__name__}, not a storage")
        if not storage.ready:
            return Pending()
        return build_view(storage, offset, size, stride, dtype, self.budget)

    def _rebuild_tensor(self, storage, storage_offset, size, stride, requires_grad=False,
                        backward_hooks=None, metadata=None):
        return self._tensor(storage, storage_offset, size, stride)

    def _rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad,
                           backward_hooks, dtype, metadata=None):
        if not isinstance(dtype, DType):
            raise UnsafeCheckpointError(f"{self.source}: _rebuild_tensor_v3 got dtype "
                                        f"{short(dtype)}")
        return self._tensor(storage, storage_offset, size, stride, dtype)

    def _rebuild_parameter(self, data, requires_grad=False, backward_hooks=None, state=None):
        if not isinstance(data, (np.ndarray, Pending)):
            raise UnsafeCheckpointError(f"{self.source}: _rebuild_parameter got "
                                        f"{type(data).__name__}")
        return data

    def _rebuild_from_type_v2(self, func, new_type, args, state):
        if id(func) not in self._rebuilders or not isinstance(new_type, TensorType) or \
                not isinstance(args, tuple):
            raise UnsafeCheckpointError(f"{self.source}: _rebuild_from_type_v2({short(func)}, "
                                        f"{short(new_type)}) refused")
        return func(*args)

    def _torch_size(self, dims=()):
        return int_tuple(dims, "torch.Size", self.source)

    def _torch_device(self, kind, index=None):
        if not isinstance(kind, str) or not (index is None or isinstance(index, int)):
            raise UnsafeCheckpointError(f"{self.source}: torch.device({short(kind)}, "
                                        f"{short(index)}) refused")
        return kind if index is None else f"{kind}:{index}"

    # ---------------------------------------------------------------- running a pickle
    def unpickle(self, file, record: str, stored_bytes: int):
        """Run the pickle in ``file`` (positioned at its start; left just past its STOP).

        ``stored_bytes``: what the pickle occupies in the file (compressed size of a zip member,
        at most the file size otherwise); it sets the opcode allowance."""
        max_ops = min(MAX_OPS, BASE_OPS + OPS_PER_STORED_BYTE * stored_bytes)
        try:
            return _RestrictedUnpickler(file, self, record, max_ops).load()
        except (PthFormatError, UnsafeCheckpointError, MemoryError):
            raise
        except Exception as exc:  # truncated / corrupt pickle, bad arguments to a stand-in
            message = short(str(exc)) if len(str(exc)) > 200 else str(exc)
            raise PthFormatError(f"{self.source}: corrupt pickle in '{record}' "
                                 f"({type(exc).__name__}: {message})") from exc

    def persistent_load(self, pid, record: str):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise UnsafeCheckpointError(f"{self.source}: unsupported persistent id {short(pid)} "
                                        f"in '{record}'")
        return self._load_storage(pid)


def _name(value) -> str:
    return value[:100] if isinstance(value, str) else short(value)


class _RestrictedUnpickler(pickle._Unpickler):  # noqa: SLF001 (the pure-Python unpickler)
    dispatch: dict = {}

    def __init__(self, file, loader: Loader, record: str, max_ops: int):
        super().__init__(file)
        self._loader, self._record, self._max_ops = loader, record, max_ops
        self._tuple_depth: dict[int, tuple[tuple, int]] = {}  # id -> (tuple kept alive, depth)

    def find_class(self, module, name):
        try:
            return self._loader.globals[(module, name)]
        except (KeyError, TypeError):
            raise UnsafeCheckpointError(
                f"{self._loader.source}: refused to load global '{_name(module)}.{_name(name)}' "
                f"in '{self._record}' (not needed to rebuild tensors; the file may be "
                "malicious)") from None

    def persistent_load(self, pid):
        return self._loader.persistent_load(pid, self._record)

    def _refuse(self, what: str, error=PthFormatError):
        raise error(f"{self._loader.source}: {what} in '{self._record}'")

    def _load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is collections.OrderedDict and _is_module_metadata(state):
            inst._metadata = state["_metadata"]
            return
        self._refuse(f"refused BUILD (set state) of {type(inst).__name__} with {short(state)}: "
                     "only a state dict's '_metadata' may be set", UnsafeCheckpointError)

    def _note_tuple(self):
        value = self.stack[-1]
        if not any(type(v) is tuple for v in value):
            return  # depth 1: not recorded (the default)
        depth = 1 + max(self._tuple_depth.get(id(v), (None, 1))[1] for v in value
                        if type(v) is tuple)
        if depth > MAX_TUPLE_DEPTH:
            self._refuse(f"tuples nested deeper than {MAX_TUPLE_DEPTH} levels")
        self._tuple_depth[id(value)] = (value, depth)

    def load(self):
        """``pickle._Unpickler.load`` with at most ``max_ops`` opcodes."""
        self._unframer = pickle._Unframer(self._file_read, self._file_readline)  # noqa: SLF001
        self.read, self.readline = self._unframer.read, self._unframer.readline
        self.readinto = self._unframer.readinto
        self.metastack, self.stack, self.proto = [], [], 0
        self.append = self.stack.append
        read, dispatch = self.read, self.dispatch
        try:
            for _ in range(self._max_ops):
                key = read(1)
                if not key:
                    raise EOFError("pickle data ended before its STOP opcode")
                dispatch[key[0]](self)
        except pickle._Stop as stop:  # noqa: SLF001
            return stop.value
        self._refuse(f"more than {self._max_ops} pickle opcodes (the allowance for its size)")


def _then(handler, after):
    def run(self):
        handler(self)
        after(self)
    return run


def _refused_opcode(self):
    self._refuse("refused protocol-5 buffer opcode")


_TUPLE_OPS = {op[0] for op in (pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3)}
_REFUSED_OPS = {op[0] for op in (pickle.BYTEARRAY8, pickle.NEXT_BUFFER, pickle.READONLY_BUFFER)}
_RestrictedUnpickler.dispatch = dict(pickle._Unpickler.dispatch)  # noqa: SLF001
_RestrictedUnpickler.dispatch[pickle.BUILD[0]] = _RestrictedUnpickler._load_build
_RestrictedUnpickler.dispatch.update({code: _refused_opcode for code in _REFUSED_OPS})
_RestrictedUnpickler.dispatch.update({code: _then(_RestrictedUnpickler.dispatch[code],
                                                  _RestrictedUnpickler._note_tuple)
                                      for code in _TUPLE_OPS})
