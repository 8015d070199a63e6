class PgolfError(Exception):
    """A user-facing failure: printed as one line naming the file or param and what was expected."""
