"""HTTP routes, one module per resource; each only validates, calls the core and shapes the answer."""
