"""Parser for the TinyNAS structure files in ``damo_jax/models/tinynas-structures/*.txt`` (SPEC §1.3).

Each file is a Python-literal list of dicts: the first entry is the stem
(``class: 'ConvKXBNRELU'``, keys ``in``/``out``/``k``/``s``), the next five are the NAS stages
(``class: 'SuperResConvK1KX'`` or ``'SuperResConvKXKX'``, keys ``in``, ``out``, ``btn``, ``k``,
``s``, ``L``). Quantisation keys (``nbitsA``/``nbitsW``) are dropped. The structure stays data;
the backbones decode it (``backbone_res.py``, ``backbone_csp.py``, ``backbone_mob.py``).
"""
from __future__ import annotations

import ast
import dataclasses
import functools
from pathlib import Path

# a folder name that is not a Python identifier: package data, not a (namespace) package
STRUCTURE_DIR = Path(__file__).resolve().parent / "tinynas-structures"
STAGE_CLASSES = {"SuperResConvK1KX": "k1kx", "SuperResConvKXKX": "kxkx"}


@dataclasses.dataclass(frozen=True)
class Stem:
    """The stem entry: ``in_ch -> out_ch`` with a ``k x k`` conv (file stride is ignored)."""
    in_ch: int
    out_ch: int
    k: int
    s: int


@dataclasses.dataclass(frozen=True)
class Stage:
    """One NAS stage: ``num_blocks`` blocks, the first ``in_ch -> out_ch`` with stride ``s``."""
    in_ch: int
    out_ch: int
    btn: int
    k: int
    s: int
    num_blocks: int
    kind: str  # "k1kx" (1x1 first conv) or "kxkx" (k x k first conv)


@dataclasses.dataclass(frozen=True)
class Structure:
    name: str
    stem: Stem
    stages: tuple[Stage, ...]


def _require(entry: dict, keys, where: str):
    missing = [k for k in keys if k not in entry]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing} in {entry}")


def parse_structure_text(text: str, name: str = "<text>") -> Structure:
    """Parse the literal list of a structure file (whitespace is stripped first, as upstream)."""
    compact = "".join(text.split())
    try:
        entries = ast.literal_eval(compact)
    except (ValueError, SyntaxError) as err:
        raise ValueError(f"structure {name}: not a Python literal list ({err})") from err
    if not isinstance(entries, list) or len(entries) < 2:
        raise ValueError(f"structure {name}: expected a list of >= 2 dicts, got {type(entries)}")
    for e in entries:
        e.pop("nbitsA", None)
        e.pop("nbitsW", None)
    head = entries[0]
    _require(head, ("class", "in", "out", "k", "s"), f"structure {name} entry 0")
    if head["class"] != "ConvKXBNRELU":
        raise ValueError(f"structure {name}: entry 0 must be ConvKXBNRELU, got {head['class']!r}")
    stem = Stem(int(head["in"]), int(head["out"]), int(head["k"]), int(head["s"]))
    stages = []
    for i, e in enumerate(entries[1:], start=1):
        where = f"structure {name} entry {i}"
        _require(e, ("class", "in", "out", "btn", "k", "s", "L"), where)
        if e["class"] not in STAGE_CLASSES:
            raise ValueError(f"{where}: unknown class {e['class']!r} (known {sorted(STAGE_CLASSES)})")
        stages.append(Stage(int(e["in"]), int(e["out"]), int(e["btn"]), int(e["k"]), int(e["s"]),
                            int(e["L"]), STAGE_CLASSES[e["class"]]))
    return Structure(name, stem, tuple(stages))


@functools.lru_cache(maxsize=None)
def load_structure(name_or_path: str) -> Structure:
    """Load ``tinynas-structures/<name>.txt`` (name with or without ``.txt``) or a file path."""
    p = Path(name_or_path)
    if not p.exists():
        p = STRUCTURE_DIR / (name_or_path if name_or_path.endswith(".txt") else f"{name_or_path}.txt")
    if not p.exists():
        known = sorted(q.stem for q in STRUCTURE_DIR.glob("*.txt"))
        raise FileNotFoundError(f"NAS structure {name_or_path!r} not found (known: {known})")
    return parse_structure_text(p.read_text(), p.stem)
