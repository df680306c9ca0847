"""The ``avec`` command: :mod:`~avec.cli.main` holds the root parser, :mod:`~avec.cli.common` the
shared helpers, and one module per command group owns its sub-parsers."""
