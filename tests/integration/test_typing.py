"""The package is typed (``py.typed``): the examples' entry points, written as a user writes them,
pass ``mypy --strict`` with the frameworks' own types (Starlette's, django-stubs' for Django)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: A user's code: the Starlette example, the Django site's WSGI and ASGI applications.
USER_FILES = ("examples/starlette/app.py", "examples/djangosite/djangosite/asgi.py",
              "examples/djangosite/djangosite/wsgi.py")


def test_the_examples_entry_points_pass_mypy_strict(tmp_path: Path) -> None:
    # --follow-imports=silent: the package is read for its types, and only the user's files judged;
    # --config-file= : no configuration of the machine's (~/.config/mypy/config) applies.
    checked = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--config-file=",
                              f"--cache-dir={tmp_path}", *USER_FILES], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-2000:]
    assert f"no issues found in {len(USER_FILES)} source files" in checked.stdout
