"""histodg: cross-organ, cross-scanner adenocarcinoma segmentation for whole-slide images."""

__version__ = "0.1.0"


def exc_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, at most `limit` characters (its type's name
    when the message is empty): what a library's error adds to histodg's one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


class HistodgError(Exception):
    """An error about one input that the CLI prints as a single line: `<path>: <reason>`."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class SlideError(HistodgError):
    """A slide cannot be opened, decoded, or lacks something it needs (such as its mpp)."""
