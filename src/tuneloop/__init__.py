"""tuneloop: from a company's own text to a deployed, self-improving language model."""

import os

# Weights come only from installed packages and local folders; never let a library reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Busy-waiting OpenMP threads slowed training ~7x when another process shared the 2 cores (measured);
# passive waiting costs nothing when the machine is idle. Only effective if set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
