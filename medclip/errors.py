"""The one exception type medclip raises for bad input; the CLI prints it as a single line."""


class MedclipError(Exception):
    """A user-facing error: wrong name, missing file, bad config value, mismatched checkpoint."""
