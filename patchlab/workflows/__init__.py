"""What a command does beyond parsing: edit failures, apply, retune around an edit, demo, report."""
