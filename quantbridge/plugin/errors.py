"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input: the message says what is wrong and how to fix it."""


class BackendUnavailable(UserError):
    """A requested backend cannot run here (library missing, no kernel for the device)."""


class NoKernel(UserError):
    """None of a backend's kernels can run this weight here; the message gives each kernel's reason."""


class NotRunnable(Exception):
    """These weights cannot run through this backend or kernel here (recorded as status 'unavailable')."""


class RowFailed(Exception):
    """A row ran and could not finish, for the reason given (recorded as status 'failed', the message as is)."""
