"""Data stage: load labelled texts, clean them, drop duplicates and conflicts, split, report."""
