"""``python -m supsup_fast ...`` is the ``supsup-fast`` command."""

from .cli import main

raise SystemExit(main())
