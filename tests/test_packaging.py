"""The installed distribution (a wheel, ``pip install git+URL``) holds what the source tree runs:
pyproject.toml names every package by hand, so a new subpackage or data file that it leaves out
would be missing from wheels while editable installs (and the rest of CI) still pass. Read from
the source tree, no build."""
from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the repo folders that the distribution maps into the damo_jax namespace (product card layout)
SOURCE_ROOTS = ("damo_jax", "configs", "export", "data_pipelines")


def _setuptools() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def _package_folders(st: dict) -> dict[str, Path]:
    """package name -> source folder, as setuptools maps them (package-dir, else dotted path)."""
    mapping = st.get("package-dir", {})
    out = {}
    for name in st["packages"]:
        base = max((k for k in mapping if name == k or name.startswith(k + ".")), key=len, default=None)
        folder = (ROOT / mapping[base] / Path(*name[len(base):].lstrip(".").split(".")) if base
                  else ROOT / Path(*name.split(".")))
        out[name] = folder
    return out


def test_every_source_package_is_in_the_distribution():
    folders = _package_folders(_setuptools())
    for name, folder in folders.items():
        assert (folder / "__init__.py").is_file(), f"pyproject.toml names {name}, {folder} is no package"
    listed = {f.resolve() for f in folders.values()}
    missing = sorted(str(p.parent.relative_to(ROOT)) for root in SOURCE_ROOTS
                     for p in (ROOT / root).rglob("__init__.py")
                     if p.parent.resolve() not in listed and "__pycache__" not in p.parts)
    assert not missing, f"packages missing from [tool.setuptools] packages in pyproject.toml: {missing}"


def test_every_non_python_file_the_packages_hold_is_package_data():
    """Files next to the modules (structure tables, C sources) ship only when package-data names
    them; a new one left out would be read from the checkout in CI and be missing when installed."""
    st = _setuptools()
    patterns = st.get("package-data", {})
    unshipped = []
    for name, folder in _package_folders(st).items():
        for f in folder.iterdir():
            if f.is_dir() or f.suffix in (".py", ".pyc", ".md") or f.name.startswith("."):
                continue
            rel = f.name
            if not any(fnmatch.fnmatch(rel, pat) for pat in patterns.get(name, ())):
                unshipped.append(f"{name}: {rel}")
        for sub in (d for d in folder.iterdir() if d.is_dir() and not (d / "__init__.py").exists()
                    and d.name != "__pycache__"):
            for f in sub.rglob("*"):
                rel = str(f.relative_to(folder))
                if f.is_file() and not any(fnmatch.fnmatch(rel, pat) for pat in patterns.get(name, ())):
                    unshipped.append(f"{name}: {rel}")
    assert not unshipped, f"files not in [tool.setuptools.package-data]: {unshipped}"
