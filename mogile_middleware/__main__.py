"""``python -m mogile_middleware``: the ``mogile-middleware`` command line."""

from .cli import main

raise SystemExit(main())
