"""``python -m tinydiff`` runs the command-line interface (see :mod:`tinydiff.cli`)."""

from tinydiff.cli import main

raise SystemExit(main())
