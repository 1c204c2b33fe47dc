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


def run_cli(main: Callable[[], T]) -> T:
    """Run an entry point; a UserError becomes one line on stderr and exit code 2."""
    try:
        return main()
    except UserError as e:
        logging.shutdown()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
