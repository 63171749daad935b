"""One exception type for problems a user can fix; the CLI prints it as one line."""


class KvxError(Exception):
    """Bad input or an unsupported model: shown to the user without a traceback."""
