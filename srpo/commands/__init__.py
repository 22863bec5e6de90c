"""Subcommands of the ``srpo`` CLI: each module has ``add_parser(subparsers)`` and ``run(args)``."""
