"""Model registry: versions in a SQL database, artifacts in folders under the tuneloop home."""
