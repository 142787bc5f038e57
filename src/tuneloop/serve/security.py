"""API keys (stored hashed, client and admin scopes) and the limits on what a request may send."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request, Security, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tuneloop.atomic import create_once
from tuneloop.config import ServeConfig, ServerSettings
from tuneloop.db.schema import ANONYMOUS, KEY_SENDER_PREFIX
from tuneloop.errors import TuneloopError
from tuneloop.privacy.keyed import home_secret, keyed_digest

log = logging.getLogger(__name__)

# Declared as security schemes, so the OpenAPI document (and /docs' Authorize button) shows how to send a key.
API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False)
BEARER = HTTPBearer(auto_error=False)


# A presented key this long cannot have been guessed at any request rate (`tuneloop keys new` makes 46
# characters); a shorter one (a plain key an operator chose for TUNELOOP_ADMIN_KEYS) might have been.
UNGUESSABLE_KEY_CHARS = 32


def hash_key(key: str) -> str:
    # Keys are 256-bit random tokens, not passwords, so a plain SHA-256 cannot be brute-forced and a
    # slow password hash would only add latency to every request.
    return hashlib.sha256(key.strip().encode()).hexdigest()


def new_key() -> str:
    return "tl_" + secrets.token_urlsafe(32)


def _hashed(plain: SecretStr | None) -> set[str]:
    """Comma-separated plain keys (from TUNELOOP_CLIENT_KEYS / TUNELOOP_ADMIN_KEYS), hashed."""
    return {hash_key(k) for k in (plain.get_secret_value() if plain else "").split(",") if k.strip()}


def key_id(digest: str) -> str:
    """A key's public name, as feedback records its sender: a prefix of its hash (which the config holds anyway),
    never the key."""
    return f"{KEY_SENDER_PREFIX}{digest[:12]}"


def address_pseudonym(secret: bytes, address: str) -> str:
    """What tells callers without a key apart in stored rows (the labelling suggestions take turns between them)
    without keeping their address: a keyed digest of it, of an IPv6 address of its /64, which one client holds."""
    try:
        ip = ipaddress.ip_address(address)
        named = str(ipaddress.ip_network(f"{ip}/64", strict=False)) if ip.version == 6 else str(ip)
    except ValueError:
        named = address
    return f"{ANONYMOUS}:{keyed_digest(secret, 'address', named)[:16]}"


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the key's id (or anonymous: no key, or one this server does not know), its scopes,
    whether its feedback trains without review, the client's address (the TCP peer's, or the one a trusted
    proxy forwarded: serve.trusted_proxies), and who it is in the rows it makes (`requester`: the key's id, or
    without one its address_pseudonym)."""

    sender: str
    scopes: frozenset[str]
    trusted: bool
    address: str = "unknown"
    requester: str = ANONYMOUS


# The hashes of admin keys a first start made, one per line, in the home (never the keys themselves).
HOME_ADMIN_KEYS = "admin-key-hashes.txt"


def home_admin_hashes(home: Path) -> set[str]:
    path = home / HOME_ADMIN_KEYS
    if not path.is_file():
        return set()
    return {line.strip().lower() for line in path.read_text(encoding="ascii").splitlines() if line.strip()}


def make_first_admin_key(config: ServerSettings) -> str | None:
    """A new admin key when none is configured anywhere (config, environment, the home), for a newcomer's admin
    page; only its hash is stored, in the home, readable by its owner alone. Returns the key to show once, or
    None when there already is one (or serve.make_admin_key is off).

    Of two servers starting at once, one makes the file (create_once); the other returns None and uses that key."""
    home = config.registry.home
    if (
        not config.serve.make_admin_key
        or config.serve.admin_key_hashes
        or _hashed(config.admin_keys)
        or home_admin_hashes(home)
    ):
        return None
    key = new_key()
    return key if create_once(home / HOME_ADMIN_KEYS, hash_key(key) + "\n") else None


class KeyRing:
    """Which hashed keys grant which scope, and which are trusted to teach; the plain keys are never kept."""

    def __init__(self, config: ServerSettings) -> None:
        self.admin = (
            set(config.serve.admin_key_hashes) | _hashed(config.admin_keys) | home_admin_hashes(config.registry.home)
        )
        self.client = set(config.serve.client_key_hashes) | _hashed(config.client_keys)
        unknown = set(config.serve.trusted_key_hashes) - self.client - self.admin
        if unknown:
            raise TuneloopError(
                f"serve.trusted_key_hashes has {len(unknown)} hash(es) that are not client or admin keys "
                f"({', '.join(sorted(h[:12] + '…' for h in unknown))}): add the key to serve.client_key_hashes too"
            )
        self.trusted = set(config.serve.trusted_key_hashes) | self.admin
        self.secret = home_secret(config.registry.home)
        plain = [
            k
            for secret in (config.admin_keys, config.client_keys)
            if secret
            for k in secret.get_secret_value().split(",")
        ]
        if any(0 < len(k.strip()) < UNGUESSABLE_KEY_CHARS for k in plain):
            log.warning(
                "TUNELOOP_ADMIN_KEYS / TUNELOOP_CLIENT_KEYS hold a key shorter than %d characters: after wrong keys "
                "from an address its holder is refused there for a while; make keys with tuneloop keys new",
                UNGUESSABLE_KEY_CHARS,
            )

    @property
    def client_open(self) -> bool:
        """With no client keys configured, predict and feedback need none (a trusted network)."""
        return not self.client

    def caller(self, key: str | None, address: str = "unknown") -> Caller:
        anonymous = Caller(
            ANONYMOUS, frozenset(), trusted=False, address=address, requester=address_pseudonym(self.secret, address)
        )
        if not key:
            return anonymous
        digest = hash_key(key)
        # Every stored hash is compared (no early exit), so the time taken does not say which one matched.
        is_admin = sum(hmac.compare_digest(digest, h) for h in self.admin) > 0
        is_client = sum(hmac.compare_digest(digest, h) for h in self.client) > 0
        if not (is_admin or is_client):
            return anonymous
        scopes = frozenset({"admin", "client"} if is_admin else {"client"})
        sender = key_id(digest)
        return Caller(sender, scopes, trusted=digest in self.trusted, address=address, requester=sender)

    @property
    def trusted_senders(self) -> set[str]:
        """The ids of the keys whose feedback trains without review."""
        return {key_id(digest) for digest in self.trusted}


async def presented_key(
    x_api_key: Annotated[str | None, Security(API_KEY_HEADER)] = None,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)] = None,
) -> str | None:
    """The key from `X-API-Key` or `Authorization: Bearer`."""
    if x_api_key:
        return x_api_key
    return bearer.credentials.strip() if bearer else None


def _identified(request: Request, key: str | None) -> Caller:
    """The caller a key names, with a limit on guessing: each wrong key counts against its address, and past
    serve.auth_failures_per_minute the address's keys are refused (401 with Retry-After) for the rest of the
    minute, unless they are right and long enough that no guessing finds them. So a right key from
    `tuneloop keys new` is never refused for what others sent from the same address (a NAT, a proxy, a fuzzer run
    beside it), while a short key cannot be found by guessing at request rate.

    The address is the TCP peer's: X-Forwarded-For counts only from a proxy named in serve.trusted_proxies
    (`ProxyHeadersMiddleware`), so a client cannot pick a new address for every guess."""
    state = request.app.state.tuneloop
    address = request.client.host if request.client else "unknown"
    caller: Caller = state.keys.caller(key, address)
    if not key or (caller.scopes and len(key.strip()) >= UNGUESSABLE_KEY_CHARS):
        return caller
    wait = state.throttle.blocked_for(address)
    if not caller.scopes:
        state.throttle.count_failure(address)
    if wait is not None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            f"too many wrong API keys from {address} (serve.auth_failures_per_minute): its keys are refused for "
            f"{wait} s, except long random ones (tuneloop keys new)",
            headers={"WWW-Authenticate": "Bearer", "Retry-After": str(wait)},
        )
    return caller


# The key checks are coroutines, not plain functions: FastAPI runs a plain dependency on the thread pool that
# replies and database calls share, and with that pool busy (a burst of chat turns) every route would wait for
# its key to be checked. They only hash and compare in memory.
async def require_client(request: Request, key: Annotated[str | None, Depends(presented_key)]) -> Caller:
    """The caller of a client route: anyone when no client keys are configured, else a client or admin key."""
    keys: KeyRing = request.app.state.tuneloop.keys
    caller = _identified(request, key)
    if keys.client_open or "client" in caller.scopes:
        return caller
    raise HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        "a valid API key is required (Authorization: Bearer <key>)",
        headers={"WWW-Authenticate": "Bearer"},
    )


async def require_admin(request: Request, key: Annotated[str | None, Depends(presented_key)]) -> Caller:
    keys: KeyRing = request.app.state.tuneloop.keys
    if not keys.admin:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "admin routes are disabled: configure an admin key "
            "(serve.admin_key_hashes or TUNELOOP_ADMIN_KEYS; tuneloop keys new --scope admin), or start "
            "tuneloop serve once without serve.make_admin_key=false to get one",
        )
    caller = _identified(request, key)
    scopes = caller.scopes
    if "client" in scopes and "admin" not in scopes:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this key has the client scope; this route needs an admin key")
    if "admin" not in scopes:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "an admin API key is required", headers={"WWW-Authenticate": "Bearer"}
        )
    return caller


async def require_metrics_access(request: Request, key: Annotated[str | None, Depends(presented_key)]) -> None:
    """/metrics is open unless serve.metrics_need_key asks for an admin key."""
    if request.app.state.tuneloop.config.serve.metrics_need_key:
        await require_admin(request, key)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def allowed_hosts(serve: ServeConfig) -> list[str]:
    """The Host header values this server answers: serve.allowed_hosts, or by default the names of the address
    it listens on (the loopback names for a loopback address); any, when it listens on every address."""
    if serve.allowed_hosts:
        return serve.allowed_hosts
    host = serve.host.strip("[]")
    if host in ("0.0.0.0", "::", ""):
        return ["*"]
    names = {"localhost", "127.0.0.1", "[::1]"} if is_loopback(host) else set()
    names.add(f"[{host}]" if ":" in host else host.lower())
    return sorted(names)


def refuse_open_exposure(config: ServerSettings, keys: KeyRing) -> None:
    """An open server (no client keys) reachable from other machines only when serve.allow_open says so."""
    host = config.serve.host
    if keys.client_open and not is_loopback(host) and not config.serve.allow_open:
        raise TuneloopError(
            f"serve.host={host} can be reached from other machines, but no client keys are configured: anyone "
            "could predict, chat and send feedback that trains the model. Create keys (tuneloop keys new) and "
            "set serve.client_key_hashes or TUNELOOP_CLIENT_KEYS, serve on 127.0.0.1 behind your own gateway, "
            "or set serve.allow_open=true to accept it"
        )


def check_text_length(text: str, limit: int, field: str) -> None:
    if len(text) > limit:
        raise TuneloopError(f"{field} has {len(text)} characters; at most {limit} (serve.max_text_chars)")


class BodySizeLimit:
    """ASGI middleware: bodies over `max_bytes` get 413 before the app reads them into memory."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _too_large(self, send: Send) -> None:
        body = json.dumps({"detail": f"request body is larger than {self.max_bytes} bytes"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException passes through FastAPI's body parsing (anything else would become a
                    # 400) and the app's exception handler turns it into the 413 answer.
                    raise HTTPException(413, f"request body is larger than {self.max_bytes} bytes")
            return message

        await self.app(scope, counting_receive, send)


class SecurityHeaders:
    """ASGI middleware: every answer says not to guess its content type, not to be framed, and not to send
    this server's URLs (they may carry ids) to other sites."""

    HEADERS = [
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        (b"referrer-policy", b"no-referrer"),
    ]

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.HEADERS]}
            await send(message)

        await self.app(scope, receive, with_headers)
