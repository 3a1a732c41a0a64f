"""The installed patchlab version."""

__version__ = "0.1.0"
