"""The distributions users install: the sdist holds what the README runs (the test suite, the
benchmark and its results, the examples), and a wheel built from it the whole package alone."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: What a checkout holds besides its files: environments, caches, builds.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", ".hypothesis", ".mypy_cache", "__pycache__", "*.egg-info",
                                    "build", "dist")
#: What running the examples leaves behind in a checkout.
LEFT_BEHIND = ("examples/tmp/", "examples/nginx.pid", "examples/djangosite/db.sqlite3")


def _build(kind: str, source: Path, into: Path) -> Path:
    """Build the ``sdist`` or ``wheel`` of ``source`` with the build backend, as pip calls it."""
    code = f"from setuptools import build_meta; print('built', build_meta.build_{kind}({str(into)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return into / done.stdout.rsplit("built ", 1)[1].strip()


def _files(under: Path) -> set[str]:
    return {path.relative_to(under.parent).as_posix() for path in under.rglob("*")
            if path.is_file() and "__pycache__" not in path.parts}


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    scratch = tmp_path_factory.mktemp("packaging")
    shutil.copytree(ROOT, scratch / "checkout", ignore=NOT_SOURCE)
    return _build("sdist", scratch / "checkout", scratch)


@pytest.fixture(scope="module")
def sdist_names(sdist: Path) -> set[str]:
    with tarfile.open(sdist) as archive:
        return {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}


def test_the_sdist_holds_what_the_readme_runs(sdist_names: set[str]) -> None:
    for top in ("bench", "examples", "tests", "mogile_middleware"):
        missing = {name for name in _files(ROOT / top) - sdist_names if not name.startswith(LEFT_BEHIND)}
        assert not missing, f"not in the sdist: {sorted(missing)[:10]}"
    assert {"README.rst", "CHANGELOG.rst", "LICENSE", "pyproject.toml"} <= sdist_names
    assert not [name for name in sdist_names if name.endswith((".pyc", ".pid")) or name.startswith(LEFT_BEHIND)]


def test_a_wheel_built_from_the_sdist_holds_the_package_alone(sdist: Path, tmp_path: Path) -> None:
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path, filter="data")
    wheel = _build("wheel", tmp_path / sdist.name.removesuffix(".tar.gz"), tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert _files(ROOT / "mogile_middleware") <= names  # every module, and py.typed
    dist_info = "-".join(wheel.name.split("-")[:2]) + ".dist-info"
    assert {name.split("/", 1)[0] for name in names} == {"mogile_middleware", dist_info}


def test_importing_it_where_there_is_no_fork_says_it_needs_posix() -> None:
    code = "import os; del os.fork, os.register_at_fork; import mogile_middleware"  # as on Windows
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == ("ImportError: mogile_middleware runs on POSIX systems only: "
                                            "this Python has no os.register_at_fork")


@pytest.mark.parametrize(("module", "needs", "extra"), [
    ("mogile_middleware.memcache", "pymemcache.client.base", "memcached"),
    ("mogile_middleware.paste", "paste.deploy.converters", "paste"),
    ("mogile_middleware.contrib.django", "django", "django")])
def test_a_module_of_an_extra_not_installed_names_the_extra(monkeypatch: pytest.MonkeyPatch, module: str, needs: str,
                                                            extra: str) -> None:
    monkeypatch.setitem(sys.modules, needs, None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ModuleNotFoundError, match=re.escape(f"pip install 'mogile_middleware[{extra}]'")) as refused:
        importlib.import_module(module)
    assert str(refused.value).startswith(f"{module} needs ")
