"""The one exception type a user can cause, and how the CLI shows it."""
from __future__ import annotations


class UserError(Exception):
    """An error the user can fix (bad params, missing data, wrong checkpoint).

    The message is one sentence that says what is wrong and what to do; the CLI prints it
    without a traceback and exits with status 2.
    """
