"""Tokens (stored only as sha256 hashes), scopes, and the source-address policy."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import ipaddress
import logging
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from pipeline.errors import BadRequest, Conflict, Forbidden, SourceNotAllowed, Unauthorized
from pipeline.instruments import AUTH_FAILURES
from pipeline.log.model import format_time, utc_now
from pipeline.log.schema import tokens

log = logging.getLogger("signalbox.auth")

TOKEN_PREFIX = "sbx_"
ADMIN_ENV_NAME = "env-admin"
WEBHOOK_ENV_NAME = "env-webhook"


class Scope(StrEnum):
    INGEST = "ingest"
    """post signals (webhooks and the API)"""
    READ = "read"
    """stream and read events, signals and the audit"""
    REPORT = "report"
    """post processing status"""
    ADMIN = "admin"
    """everything, including token management"""


@dataclass(frozen=True)
class Token:
    name: str
    scopes: frozenset[Scope]

    def allows(self, scope: Scope) -> bool:
        return Scope.ADMIN in self.scopes or scope in self.scopes

    def require(self, scope: Scope) -> None:
        if not self.allows(scope):
            AUTH_FAILURES.inc("missing_scope")
            raise Forbidden(
                f"token {self.name!r} lacks the {scope.value!r} scope: "
                f"create one with `signalbox token create NAME --scope {scope.value}`"
            )


@dataclass(frozen=True)
class TokenInfo:
    name: str
    scopes: tuple[str, ...]
    created_at: str
    expires_at: str | None
    revoked_at: str | None


def new_secret() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def parse_scopes(values: Iterable[str]) -> frozenset[Scope]:
    scopes = set()
    for value in values:
        try:
            scopes.add(Scope(value))
        except ValueError:
            raise BadRequest(
                f"unknown scope {value!r}: use {', '.join(s.value for s in Scope)}"
            ) from None
    if not scopes:
        raise BadRequest("a token needs at least one scope")
    return frozenset(scopes)


class TokenStore:
    """Tokens in the database. Lookups are by hash; verification is cached for a moment."""

    def __init__(self, engine: AsyncEngine, *, cache_seconds: float = 2.0) -> None:
        self.engine = engine
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, Token | None]] = {}
        self._pending: dict[str, asyncio.Future[Token | None]] = {}

    async def authenticate(self, secret: str | None) -> Token:
        """The token for ``secret``, or :class:`Unauthorized`. Never logs or stores ``secret``."""
        if not secret:
            AUTH_FAILURES.inc("missing_token")
            raise Unauthorized("no token: send `Authorization: Bearer TOKEN`")
        digest = hash_secret(secret)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and now - cached[0] < self.cache_seconds:
            token = cached[1]
        else:
            token = await self._lookup_once(digest, now)
        if token is None:
            AUTH_FAILURES.inc("bad_token")
            raise Unauthorized("unknown, revoked or expired token: check it, or create a new one")
        return token

    async def _lookup_once(self, digest: str, now: float) -> Token | None:
        """One database lookup per token at a time: the requests that find its cache entry
        expired together wait for the same answer instead of each asking again."""
        pending = self._pending.get(digest)
        if pending is None:
            pending = asyncio.ensure_future(self._lookup(digest))
            self._pending[digest] = pending
            try:
                token = await asyncio.shield(pending)
            finally:
                del self._pending[digest]
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (now, token)
            return token
        return await asyncio.shield(pending)

    async def _lookup(self, digest: str) -> Token | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(
                select(tokens).where(tokens.c.token_hash == digest)
            )).one_or_none()
        # The row was found through an index on the hash; compare again in constant time.
        if row is None or not hmac.compare_digest(row.token_hash, digest):
            return None
        if row.revoked_at is not None:
            return None
        if row.expires_at is not None and row.expires_at <= format_time(utc_now()):
            return None
        return Token(row.name, frozenset(Scope(s) for s in row.scopes.split(",") if s))

    async def still_valid(self, digests: Iterable[str]) -> set[str]:
        """Which of these token hashes still belong to an active, unexpired token: asked of the
        database (one query per 500 tokens), not of the cache, whose entries it refreshes."""
        wanted = sorted(set(digests))
        valid: set[str] = set()
        now = time.monotonic()
        for start in range(0, len(wanted), 500):
            chunk = wanted[start:start + 500]
            async with self.engine.connect() as conn:
                rows = (await conn.execute(
                    select(tokens).where(tokens.c.token_hash.in_(chunk))
                )).all()
            now_text = format_time(utc_now())
            for row in rows:
                if row.revoked_at is None and (row.expires_at is None
                                               or row.expires_at > now_text):
                    valid.add(row.token_hash)
            for digest in chunk:
                if digest not in valid:
                    self._cache[digest] = (now, None)
        return valid

    async def create(self, name: str, scopes: Iterable[str], *,
                     expires_at: datetime | None = None, secret: str | None = None) -> str:
        """Store a new token and return its secret (the only time it is ever shown)."""
        name = validate_name(name)
        granted = parse_scopes(scopes)
        secret = secret or new_secret()
        async with self.engine.begin() as conn:
            existing = (await conn.execute(
                select(tokens.c.revoked_at).where(tokens.c.name == name)
            )).one_or_none()
            if existing is not None and existing.revoked_at is not None:
                raise Conflict(f"a token named {name!r} was revoked at {existing.revoked_at}; "
                               "a name is never given to another token, so that the events "
                               "it recorded name one token: choose another name")
            if existing is not None:
                raise Conflict(f"a token named {name!r} exists: revoke it or choose another name")
            insert = tokens.insert().values(
                name=name,
                token_hash=hash_secret(secret),
                scopes=",".join(sorted(s.value for s in granted)),
                created_at=format_time(utc_now()),
                expires_at=format_time(expires_at) if expires_at else None,
            )
            try:
                await conn.execute(insert)
            except IntegrityError:  # created a moment ago by someone else
                raise Conflict(f"a token named {name!r} exists: revoke it or choose another "
                               "name") from None
        return secret

    async def put(self, name: str, scopes: Iterable[str], secret: str) -> None:
        """Create or replace the token ``name`` with ``secret`` (bootstrap from the environment)."""
        granted = ",".join(sorted(s.value for s in parse_scopes(scopes)))
        digest = hash_secret(secret)
        for attempt in range(3):  # instances starting together race for the same rows
            try:
                async with self.engine.begin() as conn:
                    current = (await conn.execute(select(tokens).where(
                        tokens.c.token_hash == digest))).one_or_none()
                    if (current is not None and current.name == name
                            and current.scopes == granted and current.revoked_at is None
                            and current.expires_at is None):
                        break  # already so
                    await conn.execute(tokens.delete().where(
                        (tokens.c.name == name) | (tokens.c.token_hash == digest)
                    ))
                    await conn.execute(tokens.insert().values(
                        name=name, token_hash=digest, scopes=granted,
                        created_at=format_time(utc_now()), expires_at=None, revoked_at=None,
                    ))
                break
            except IntegrityError:
                if attempt == 2:
                    raise
        self._cache.clear()

    async def revoke(self, name: str) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(tokens).where(tokens.c.name == name, tokens.c.revoked_at.is_(None))
                .values(revoked_at=format_time(utc_now()))
            )
        self._cache.clear()
        return bool(result.rowcount)

    async def list(self) -> list[TokenInfo]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(tokens).order_by(tokens.c.name))).all()
        return [
            TokenInfo(r.name, tuple(r.scopes.split(",")), r.created_at, r.expires_at,
                      r.revoked_at)
            for r in rows
        ]

    async def count_active(self) -> int:
        return sum(1 for t in await self.list() if t.revoked_at is None)


def validate_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > 100 or not all(c.isalnum() or c in "-_.@" for c in name):
        raise BadRequest("a token name is 1-100 letters, digits or - _ . @")
    return name


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class SourcePolicy:
    """Which client addresses may post webhooks, and which proxies may name the client.

    ``X-Forwarded-For`` is read right to left and only while the hop that added an entry is a
    trusted proxy: the first address not in ``trusted`` is the client. An empty ``allowed``
    list allows everyone.
    """

    allowed: tuple[Network, ...] = ()
    trusted: tuple[Network, ...] = ()

    @classmethod
    def from_settings(cls, allowed: Iterable[str], trusted: Iterable[str]) -> SourcePolicy:
        return cls(
            tuple(ipaddress.ip_network(a, strict=False) for a in allowed),
            tuple(ipaddress.ip_network(t, strict=False) for t in trusted),
        )

    def client_address(self, peer: str | None, headers: Mapping[str, str]) -> str | None:
        address = _parse_address(peer)
        if address is None:
            return peer
        forwarded = headers.get("x-forwarded-for")
        if not forwarded:
            return str(address)
        if not self._is_trusted(address):
            _ignored_forwarding(address)
            return str(address)
        for hop in reversed([h.strip() for h in forwarded.split(",")]):
            hop_address = _parse_address(hop)
            if hop_address is None:
                break
            address = hop_address
            if not self._is_trusted(hop_address):
                break
        return str(address)

    def check(self, client: str | None) -> None:
        if not self.allowed:
            return
        address = _parse_address(client)
        if address is None or not any(address in network for network in self.allowed):
            AUTH_FAILURES.inc("source_not_allowed")
            raise SourceNotAllowed(
                f"source address {client} is not in the allowlist: add it to "
                "SIGNALBOX_ALLOWED_SOURCES (or configure SIGNALBOX_TRUSTED_PROXIES if a proxy "
                "forwards for it)"
            )

    def trusts(self, peer: str | None) -> bool:
        """Whether ``peer`` (a TCP peer address) is one of the trusted proxies."""
        address = _parse_address(peer)
        return address is not None and self._is_trusted(address)

    def _is_trusted(self, address: Address) -> bool:
        return any(address in network for network in self.trusted)


_IGNORED_FROM: set[Address] = set()
IGNORED_WARNINGS = 16  # distinct peers warned about, at most: a client may send the header too


def _ignored_forwarding(peer: Address) -> None:
    """Say once per peer (a reverse proxy not listed, most likely) that its X-Forwarded-For
    counts for nothing: the client address is the peer's own."""
    if peer in _IGNORED_FROM or len(_IGNORED_FROM) >= IGNORED_WARNINGS:
        return
    _IGNORED_FROM.add(peer)
    log.warning("X-Forwarded-For from %s ignored: it is not in SIGNALBOX_TRUSTED_PROXIES, so "
                "its requests count as coming from %s itself; if it is a reverse proxy, list "
                "it there", peer, peer)


def _parse_address(value: str | None) -> Address | None:
    return _parsed(value) if value else None


@functools.lru_cache(maxsize=4096)  # a request's peer is parsed more than once, and repeats
def _parsed(value: str) -> Address | None:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def bearer_token(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization")
    if not value:
        return None
    scheme, _, credential = value.partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        return None
    return credential.strip()
