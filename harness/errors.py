"""Errors the harness raises on purpose.

Every message names what is wrong, where, and how to fix it; the CLI prints it as one line and
exits with status 2.
"""


class HarnessError(Exception):
    """Root of every error the harness raises deliberately."""


class InvalidCase(HarnessError):
    """A case that describes no valid attention problem (or a malformed case file)."""


class UsageError(HarnessError):
    """Bad command-line or plugin options."""


class BackendUnavailable(HarnessError):
    """A backend that cannot run on this machine (missing package, no device)."""


class RecordsError(HarnessError):
    """A results file that does not follow the records schema."""
