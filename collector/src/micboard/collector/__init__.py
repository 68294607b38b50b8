"""micboard fleet collector."""

from micboard.shared import __version__

__all__ = ["__version__"]
