"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input: the message says what is wrong and how to fix it."""


class BackendUnavailable(UserError):
    """A requested backend cannot run here (library missing, no kernel for the device)."""
