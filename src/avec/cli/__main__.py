"""``python -m avec.cli`` runs the ``avec`` command."""

from avec.cli.main import main

raise SystemExit(main())
