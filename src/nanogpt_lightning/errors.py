"""User mistakes become one clear line on stderr and a non-zero exit, never a traceback."""

import functools
import sys


class UserError(Exception):
    """A problem the user can fix; the message says how."""


def exit_on_user_error(main):
    """Decorate an entry point: a UserError prints `error: <message>` and exits with status 1."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)

    return wrapper
