"""sga subcommands of this package (filled in by its issue)."""


def register(subparsers) -> None:
    """Add this package's subcommands to the ``sga`` parser."""
