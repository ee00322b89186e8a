"""Fuzz the torch-free ``.pth`` reader: hundreds of seeded mutations of real torch files (byte flips,
pickle opcode and argument mutations, zip header fields, storage sizes and contents), each loaded
in a worker subprocess under an address-space limit (``RLIMIT_AS``). Only a clean load or a
``PthFormatError`` / ``UnsafeCheckpointError`` is accepted: any other exception, a crash, a
``MemoryError`` or a load slower than ``SLOW_S`` fails the test, naming the mutation."""
from __future__ import annotations

import io
import json
import os
import pickletools
import random
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SEED, CASES_PER_BASE, SLOW_S = 20261202, 110, 10.0
INTERESTING = [0, 1, -1, 2, 3, 4, 7, 8, 255, 256, 40000, 2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1,
               -2**63, 10**30]

_WORKER = r"""
import json, os, resource, sys, time, traceback
from damo_jax.interop.pth_io import PthFormatError, UnsafeCheckpointError, load_pth
with open("/proc/self/status") as fh:
    vm = next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), vm + (1 << 30)))
for line in sys.stdin:
    path = line.strip()
    start = time.perf_counter()
    try:
        load_pth(path)
        outcome = "loaded"
    except (PthFormatError, UnsafeCheckpointError) as exc:
        outcome = "refused" if str(exc).startswith(path) else "unnamed: " + str(exc)[:300]
    except BaseException as exc:
        outcome = "FAIL " + "".join(traceback.format_exception(exc))[-1500:]
    print(json.dumps({"path": path, "outcome": outcome, "s": time.perf_counter() - start}),
          flush=True)
"""


# ----------------------------------------------------------------------------- mutations
def _zip_rewrite(raw: bytes, member: str, new: bytes, compress: int | None = None) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            data = new if info.filename.endswith(member) else zin.read(info)
            zout.writestr(info.filename, data, compress if compress is not None else info.compress_type)
    return out.getvalue()


def _flip_bytes(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    data = bytearray(raw)
    spots = [rng.randrange(len(data)) for _ in range(rng.randint(1, 8))]
    for i in spots:
        data[i] ^= rng.randint(1, 255)
    return bytes(data), f"flip bytes at {spots}"


def _splice(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    i = rng.randrange(len(raw))
    kind = rng.choice(["truncate", "delete", "insert", "duplicate"])
    if kind == "truncate":
        return raw[:i], f"truncate at {i}"
    n = rng.randint(1, 64)
    if kind == "delete":
        return raw[:i] + raw[i + n:], f"delete {n} at {i}"
    if kind == "insert":
        return raw[:i] + bytes(rng.randrange(256) for _ in range(n)) + raw[i:], f"insert {n} at {i}"
    return raw[:i] + raw[i:i + n] * rng.randint(2, 50) + raw[i + n:], f"duplicate {n} at {i}"


def _mutate_pickle(pkl: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Change one opcode, one integer argument, or delete / repeat one opcode."""
    ops = list(pickletools.genops(pkl))
    index = rng.randrange(len(ops))
    op, arg, pos = ops[index]
    end = ops[index + 1][2] if index + 1 < len(ops) else len(pkl)
    ints = [i for i, (o, a, _) in enumerate(ops) if isinstance(a, int) and o.name != "PROTO"]
    kind = rng.choice(["opcode", "int", "int", "delete", "repeat"])
    if kind == "int" and ints:
        index = rng.choice(ints)
        op, arg, pos = ops[index]
        end = ops[index + 1][2]
        value = rng.choice(INTERESTING + [arg + rng.randint(-3, 3), arg * rng.randint(2, 1000)])
        data = pickle_long(value)
        return pkl[:pos] + data + pkl[end:], f"int {op.name}@{pos} {arg} -> {value}"
    if kind == "opcode":
        code = rng.choice(pickletools.opcodes).code.encode("latin-1")
        return pkl[:pos] + code + pkl[pos + 1:], f"opcode {op.name}@{pos} -> {code!r}"
    if kind == "delete":
        return pkl[:pos] + pkl[end:], f"delete {op.name}@{pos}"
    return pkl[:pos] + pkl[pos:end] * rng.randint(2, 2000) + pkl[end:], f"repeat {op.name}@{pos}"


def pickle_long(value: int) -> bytes:
    import pickle
    data = pickle.encode_long(value)
    return b"\x8a" + bytes([len(data)]) + data


def _zip_header(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Overwrite a size / method / crc / name-length / offset field of a local or central header."""
    data = bytearray(raw)
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        info = rng.choice(archive.infolist())
    central = [i for i in range(len(data) - 4) if data[i:i + 4] == b"PK\x01\x02"]
    where = rng.choice(["local", "central"]) if central else "local"
    base = info.header_offset if where == "local" else rng.choice(central)
    fields = {"method": (8, "<H"), "crc": (14, "<I"), "compress_size": (18, "<I"),
              "file_size": (22, "<I"), "name_len": (26, "<H"), "extra_len": (28, "<H")}
    if where == "central":
        fields = {k: (o + 2, f) for k, (o, f) in fields.items()}
        fields["header_offset"] = (42, "<I")
    name = rng.choice(sorted(fields))
    offset, fmt = fields[name]
    limit = 2 ** (8 * struct.calcsize(fmt))
    value = rng.choice([0, 1, 8, 12, 14, 99, 16, 432, info.file_size + 1, info.file_size * 1000,
                        limit - 1, rng.randrange(limit)]) % limit
    struct.pack_into(fmt, data, base + offset, value)
    return bytes(data), f"{where} header of {info.filename}: {name} -> {value}"


def _zip_mutation(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    kind = rng.choice(["pickle", "pickle", "header", "storage", "flip", "splice", "deflate"])
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        names = archive.namelist()
        pkl_name = next(n for n in names if n.endswith("/data.pkl"))
        if kind == "pickle":
            pkl, what = _mutate_pickle(archive.read(pkl_name), rng)
            return _zip_rewrite(raw, pkl_name, pkl), what
        if kind == "storage":
            name = rng.choice([n for n in names if "/data/" in n or n.endswith("byteorder")])
            old = archive.read(name)
            new = rng.choice([old[:rng.randrange(len(old) + 1)], old + bytes(rng.randint(1, 64)),
                              b"", b"big", b"\xff\xfe", old * 3])
            return _zip_rewrite(raw, name, new), f"member {name}: {len(old)} -> {len(new)} bytes"
    if kind == "header":
        return _zip_header(raw, rng)
    if kind == "deflate":  # deflate every member, then damage the result
        return _flip_bytes(_zip_rewrite(raw, "\0", b"", zipfile.ZIP_DEFLATED), rng)
    return (_flip_bytes if kind == "flip" else _splice)(raw, rng)


def _legacy_mutation(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    kind = rng.choice(["pickle", "pickle", "count", "flip", "splice"])
    if kind in ("pickle", "count"):
        starts, pos = [], 0
        for _ in range(5):  # magic, protocol, sys info, data, keys
            starts.append(pos)
            pos = next(p for o, _, p in pickletools.genops(io.BytesIO(raw[pos:]))
                       if o.name == "STOP") + pos + 1
        if kind == "count":  # the first storage's int64 element count
            value = rng.choice(INTERESTING) % 2**64
            return raw[:pos] + struct.pack("<Q", value) + raw[pos + 8:], f"storage count -> {value}"
        k = rng.randrange(5)
        end = starts[k + 1] if k < 4 else pos
        pkl, what = _mutate_pickle(raw[starts[k]:end], rng)
        return raw[:starts[k]] + pkl + raw[end:], f"pickle {k}: {what}"
    return (_flip_bytes if kind == "flip" else _splice)(raw, rng)


def _cases(tmp: Path) -> dict[str, str]:
    cases = {}
    for base in ("pth_official.pth", "pth_misc.pkl", "pth_legacy.pth"):
        raw = (FIXTURES / base).read_bytes()
        mutate = _legacy_mutation if base == "pth_legacy.pth" else _zip_mutation
        for i in range(CASES_PER_BASE):
            rng = random.Random(f"{SEED}/{base}/{i}")
            try:
                data, what = mutate(raw, rng)
            except (zipfile.BadZipFile, ValueError, StopIteration, struct.error) as exc:
                data, what = _flip_bytes(raw, rng)[0], f"flip (mutation failed: {exc})"
            path = tmp / f"{Path(base).stem}_{i}.pth"
            path.write_bytes(data)
            cases[str(path)] = f"{base} #{i}: {what}"
    return cases


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and RLIMIT_AS")
def test_mutated_checkpoints_load_or_fail_cleanly(tmp_path):
    cases = _cases(tmp_path)
    env = dict(os.environ, DAMO_JAX_PTH_MAX_BYTES=str(256 << 20), OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _WORKER], input="\n".join(cases) + "\n",
                          capture_output=True, text=True, timeout=600, env=env)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    done = {r["path"] for r in results}
    crashed = next((p for p in cases if p not in done), None)
    assert proc.returncode == 0 and crashed is None, (
        f"worker exit {proc.returncode} at {cases.get(crashed)}\n{proc.stderr[-3000:]}")
    bad = [f"{cases[r['path']]}: {r['outcome']}" for r in results
           if r["outcome"] not in ("loaded", "refused")]
    slow = [f"{cases[r['path']]}: {r['s']:.1f} s" for r in results if r["s"] > SLOW_S]
    assert not bad and not slow, "\n".join(bad + slow)
    outcomes = [r["outcome"] for r in results]
    assert len(outcomes) == 3 * CASES_PER_BASE
    assert outcomes.count("refused") > len(outcomes) // 3 and outcomes.count("loaded") > 0
