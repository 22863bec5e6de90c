"""The ``srpo`` command. Only this module parses arguments and turns errors into exit codes:
bad input -> one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import UserError

COMMANDS = ["train", "sample", "score", "eval", "lab", "bench", "plan", "export", "report", "init"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own code for usage errors)
        self.exit(2, f"srpo: error: {message} (see srpo {self.prog.split()[-1]} --help)\n")


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = _Parser(prog="srpo", description="Semantic-Relative Preference Optimization for flow models")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    modules = {}
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"srpo.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"srpo.commands.{name}":
                raise
            continue  # a subcommand not built yet
        mod.add_parser(sub)
        modules[name] = mod
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # library chatter is not the user's problem
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("WANDB_SILENT", "true")
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    try:
        return modules[args.command].run(args) or 0
    except UserError as e:
        print(f"srpo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("srpo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
