"""The one exception type patchlab raises for bad input; the CLI turns it into exit code 2."""

from __future__ import annotations


class PatchlabError(ValueError):
    """A user-facing error: one line that names the file / line / field or the parameter at fault.

    `param` is the Python parameter's name (`device_map`, `heads`); `where` a file, line or item. The
    message names other parameters in backticks (`workers`). The command line shows its own flag for
    each parameter it knows (`--device-map`), so a Python caller never reads about a flag it did not type.
    """

    def __init__(self, message: str, *, where: str | None = None, param: str | None = None):
        where = None if where is None else str(where)
        self.message, self.where, self.param = message, where, param
        at = " ".join(p for p in (param, where) if p)
        super().__init__(f"{at}: {message}" if at else message)

    def shown(self, flag_for) -> str:
        """The message with each known parameter name replaced by `flag_for(name)` (None: keep the name)."""
        import re

        def swap(name: str) -> str:
            return flag_for(name) or name

        message = re.sub(
            r"`([a-z_]+)`", lambda m: swap(m.group(1)) if flag_for(m.group(1)) else m.group(0), self.message
        )
        at = " ".join(p for p in (swap(self.param) if self.param else None, self.where) if p)
        return f"{at}: {message}" if at else message
