"""The one exit-code convention of the project's command-line tools."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping


def run_command(prog: str, commands: Mapping[str, Callable[[argparse.Namespace], int]], args: argparse.Namespace,
                usage_errors: tuple[type[BaseException], ...]) -> int:
    """Run ``commands[args.command]``; map errors to exit codes (2: ``usage_errors``, 1: other OSError).

    The message names the command and the cause, on one line.
    """
    try:
        return int(commands[args.command](args))
    except usage_errors as exc:
        print(f"{prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{prog} {args.command}: error: {exc}", file=sys.stderr)
        return 1
