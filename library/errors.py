"""User-facing errors: one clear line, a non-zero exit, no traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

T = TypeVar("T")

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input (a file, an option, a config key) that they can fix.

    The message is a single line naming the file, key or option, what was found and what to do.
    """


def fail(message: str) -> NoReturn:
    raise UserError(message)


def _close_progress_bars() -> None:
    """End open progress bars' lines, so the error starts a line of its own."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def one_line(message: str) -> str:
    """A UserError raised in a data-loader worker comes back wrapped with the worker's traceback; keep the
    original message, the last line."""
    if "Original Traceback" not in message:
        return message
    last = message.strip().splitlines()[-1]
    return last.split("UserError: ", 1)[-1]


def run_cli(main: Callable[[], T]) -> T:
    """Run an entry point; a UserError becomes one line on stderr and exit code 2."""
    try:
        return main()
    except UserError as e:
        logging.shutdown()
        _close_progress_bars()
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
