"""User-facing errors: an expected mistake (bad file, bad argument, bad model) is one of these.

CLI commands print its message as one line and exit non-zero, without a traceback.
"""


class WsssError(Exception):
    """An expected, user-facing error; the message names what was wrong and what was expected."""


class BundleError(WsssError):
    """A model bundle or checkpoint file that cannot be used."""


class SlideError(WsssError):
    """A slide that cannot be opened or read."""


class DataError(WsssError):
    """A dataset file or folder that does not follow its description."""
