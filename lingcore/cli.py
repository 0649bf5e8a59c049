"""The one exit-code convention of the project's command-line tools.

0 success; 1 an operation failed (an ``OSError``); 2 bad arguments or configuration, and a store that
cannot be used at all (unreachable, forbidden, not found, bad endpoint: :mod:`lingcore.probe`); 130
interrupted (Ctrl-C). Each error is one line on stderr naming the command, the URL and the case; the
traceback is logged at DEBUG only (``--log-level DEBUG``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Mapping

from lingcore.errors import StoreAccessError
from lingcore.probe import explain

log = logging.getLogger("lingcore.cli")


def run_command(prog: str, commands: Mapping[str, Callable[[argparse.Namespace], int]], args: argparse.Namespace,
                usage_errors: tuple[type[BaseException], ...],
                url_of: Callable[[argparse.Namespace], str | None] | None = None) -> int:
    """Run ``commands[args.command]``; map errors to exit codes (see the module docstring).

    Args:
        prog: The command's name, for the message.
        commands: Subcommand name -> handler returning the exit status.
        args: Parsed arguments (``args.command`` picks the handler; ``args.endpoint_url`` is used when set).
        usage_errors: Exceptions that mean bad arguments (exit 2).
        url_of: The URL the command works on, so a store failure (a botocore error, a bare
            ``PermissionError``) becomes one line naming it (:func:`lingcore.probe.explain`).
    """
    try:
        return int(commands[args.command](args))
    except KeyboardInterrupt:
        print(f"{prog} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - mapped below; anything else is re-raised with its traceback
        url = url_of(args) if url_of is not None else None
        shown = explain(exc, url, endpoint_url=getattr(args, "endpoint_url", None)) if url else exc
        if not isinstance(shown, (StoreAccessError, OSError, *usage_errors)):
            raise
        log.debug("%s %s failed", prog, args.command, exc_info=exc)
        print(f"{prog} {args.command}: error: {shown}", file=sys.stderr)
        return 2 if isinstance(shown, (StoreAccessError, *usage_errors)) else 1
