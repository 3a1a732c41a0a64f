"""The Result base and its registry, figures, tables and the HTML report."""
