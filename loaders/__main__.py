"""``python -m loaders``: the ``loaders`` command line (pack, inspect)."""

from loaders.cli import main

raise SystemExit(main())
