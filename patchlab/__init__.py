"""patchlab: find and fix the attention heads behind failed two-hop compositions."""

from .errors import PatchlabError

__version__ = "0.1.0"
__all__ = ["PatchlabError", "__version__"]
