"""Evaluation stage: metrics, plots and a self-contained HTML report."""
