"""One exception type for every mistake a user can fix; the CLI prints its message and exits with status 2."""


class LmrcError(Exception):
    """A problem with the user's input (file, mask, checkpoint, config), stated with the fix."""
