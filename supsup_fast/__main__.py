"""``python -m supsup_fast ...`` is the ``supsup-fast`` command."""

from .experiments.cli import main

raise SystemExit(main())
