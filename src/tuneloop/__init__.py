"""tuneloop: from a company's own text to a deployed, self-improving language model."""

__version__ = "0.1.0"
