"""The value chain, one file per step: gap, lens, locate, edit, editeval."""
