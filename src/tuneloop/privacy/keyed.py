"""Keyed digests: how tuneloop names a user's text or address without keeping it.

A plain hash of a short text (a phone number in a sentence, an IPv4 address) is undone by trying every
candidate, so each digest is an HMAC under a secret kept in the home, made on first use and readable by its
owner only. Every process of a home (replicas, CLI commands, jobs) reads the same secret, so their digests agree.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from tuneloop.atomic import create_once
from tuneloop.errors import TuneloopError

# The home's secret for naming texts and addresses (erasure, who asked for a prediction).
PRIVACY_SECRET_FILE = "privacy.secret"


def home_secret(home: Path, name: str = PRIVACY_SECRET_FILE) -> bytes:
    """The home's secret in file `name`, made on first use (owner-readable only). Of processes making it at once,
    one does (create_once) and the others read it."""
    path = Path(home) / name
    if not path.exists():
        create_once(path, secrets.token_hex(32))
    secret = path.read_text(encoding="ascii").strip()
    if len(secret) < 32:
        raise TuneloopError(f"{path} does not hold a secret; delete it and a new one is made")
    return secret.encode()


def keyed_digest(secret: bytes, purpose: str, value: str) -> str:
    """A hex digest of `value` under `secret`; `purpose` keeps digests made for different uses apart."""
    return hmac.new(secret, f"{purpose}\0{value}".encode(), hashlib.sha256).hexdigest()
