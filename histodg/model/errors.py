"""The model package's error: a model cannot be built, or its weights cannot be loaded."""
from __future__ import annotations

from .. import HistodgError


class ModelError(HistodgError):
    """A model cannot be built or its weights cannot be loaded."""
