"""Errors, atomic files, prompt sets, head specs, progress bars: imports nothing else of patchlab."""
