"""One exception type for every mistake a user can fix, one warning type for every repair: the CLI prints the
error's message and exits with status 2, and each warning as one line."""


class LmrcError(Exception):
    """A problem with the user's input (file, mask, checkpoint, config), stated with the fix."""


class BadFrameError(LmrcError):
    """A frame of the input cannot be decoded (`--skip-bad-frames` goes on without it)."""


class LmrcWarning(UserWarning):
    """Something in the user's input was repaired or skipped; the run goes on (e.g. a bad frame, a resized mask)."""
