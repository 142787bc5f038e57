"""Training recipes: one module per recipe."""
