"""histodg: cross-organ, cross-scanner adenocarcinoma segmentation for whole-slide images."""

__version__ = "0.1.0"


class HistodgError(Exception):
    """An error about one input that the CLI prints as a single line: `<path>: <reason>`."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class SlideError(HistodgError):
    """A slide cannot be opened, decoded, or lacks something it needs (such as its mpp)."""
