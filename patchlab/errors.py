"""The one exception type patchlab raises for bad input; the CLI turns it into exit code 2."""

from __future__ import annotations


class PatchlabError(ValueError):
    """A user-facing error: one line that names the file / line / field or argument at fault."""

    def __init__(self, message: str, *, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)
