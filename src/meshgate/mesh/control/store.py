"""The control plane's state: join tokens, the issuance audit log, registered
instances and their leases, config generations, and what each proxy has.

`Store` is the interface; `SqliteStore` is the embedded default (one file in
the state directory, WAL mode, so that `meshgate token` and `meshgate mesh
status` can read and write it while `meshgate control` runs). Everything a
restart must keep is here: a restarted control plane reissues nothing and
forgets no lease, token or generation.

Tokens are stored hashed (SHA-256 of the secret: the secret is 32 random
bytes, so a slow hash adds nothing); the secret is shown once, at creation.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Instance", "SqliteStore", "Store", "TokenError", "TokenRecord"]

TOKEN_PREFIX = "mgt_"


class TokenError(ValueError):
    """A join token that cannot be used, with the reason."""


@dataclass(frozen=True)
class TokenRecord:
    token_id: str
    service: str
    created: float
    expires: float | None
    revoked: bool
    single_use: bool
    used: bool


@dataclass
class Instance:
    """One registered instance of a service."""

    instance_id: str
    service: str
    address: str
    port: int
    identity: str
    version: str = ""
    zone: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    lease_expires: float = 0.0
    registered: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "service": self.service,
            "address": self.address,
            "port": self.port,
            "identity": self.identity,
            "version": self.version,
            "zone": self.zone,
            "metadata": self.metadata,
            "lease_expires": self.lease_expires,
            "registered": self.registered,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Instance:
        return cls(**doc)


def _split_token(token: str) -> tuple[str, str]:
    if not token.startswith(TOKEN_PREFIX) or "." not in token:
        raise TokenError("not a meshgate join token")
    token_id, _, secret = token[len(TOKEN_PREFIX) :].partition(".")
    if not token_id or not secret:
        raise TokenError("not a meshgate join token")
    return token_id, secret


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Store:
    """What the control plane keeps; every method is short and synchronous."""

    def create_token(
        self, service: str, *, ttl: float | None = None, single_use: bool = False
    ) -> str:
        """A new join token for `service`; only its digest is kept."""
        token_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        now = time.time()
        record = TokenRecord(
            token_id, service, now, now + ttl if ttl else None, False, single_use, False
        )
        self._put_token(record, _digest(secret))
        self.audit("token-created", token_id=token_id, service=service, expires=ttl)
        return f"{TOKEN_PREFIX}{token_id}.{secret}"

    def check_token(self, token: str, now: float | None = None) -> TokenRecord:
        """The token's record, or TokenError saying why it cannot be used."""
        token_id, secret = _split_token(token)
        found = self._get_token(token_id)
        if found is None or not hmac.compare_digest(found[1], _digest(secret)):
            raise TokenError("unknown token")
        record = found[0]
        if record.revoked:
            raise TokenError(f"token {token_id} was revoked")
        if record.expires is not None and (now or time.time()) >= record.expires:
            raise TokenError(f"token {token_id} has expired")
        if record.single_use and record.used:
            raise TokenError(f"token {token_id} was already exchanged for a certificate")
        return record

    def _put_token(self, record: TokenRecord, digest: str) -> None:
        raise NotImplementedError

    def _get_token(self, token_id: str) -> tuple[TokenRecord, str] | None:
        """The record and the secret's digest."""
        raise NotImplementedError

    def use_token(self, token_id: str) -> None:
        raise NotImplementedError

    def revoke_token(self, token_id: str) -> bool:
        raise NotImplementedError

    def tokens(self) -> list[TokenRecord]:
        raise NotImplementedError

    def audit(self, event: str, **fields: Any) -> None:
        raise NotImplementedError

    def audit_log(self, limit: int = 1000) -> list[dict[str, Any]]:
        raise NotImplementedError

    def put_instance(self, inst: Instance) -> None:
        raise NotImplementedError

    def renew_lease(self, instance_id: str, expires: float) -> bool:
        raise NotImplementedError

    def remove_instance(self, instance_id: str) -> None:
        raise NotImplementedError

    def instances(self) -> list[Instance]:
        raise NotImplementedError

    def next_version(self) -> int:
        raise NotImplementedError

    def save_generation(self, text: str, source: str) -> int:
        raise NotImplementedError

    def generations(self, limit: int = 20) -> list[dict[str, Any]]:
        raise NotImplementedError

    def generation_text(self, generation: int) -> str | None:
        raise NotImplementedError

    def subscribe(self, callback: Callable[[str], None]) -> None:
        """Call `callback(what)`, from any thread, when another control-plane
        instance changed something (a single-process store has none)."""
        return None

    def put_proxy(self, proxy_id: str, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def put_proxies(self, states: dict[str, dict[str, Any]]) -> None:
        """Several proxies' states at once (one transaction where it can)."""
        for proxy_id, state in states.items():
            self.put_proxy(proxy_id, state)

    def proxies(self) -> dict[str, dict[str, Any]]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    token_id TEXT PRIMARY KEY, service TEXT NOT NULL, digest TEXT NOT NULL,
    created REAL NOT NULL, expires REAL, revoked INTEGER NOT NULL DEFAULT 0,
    single_use INTEGER NOT NULL DEFAULT 0, used INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, event TEXT NOT NULL,
    doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instances (
    instance_id TEXT PRIMARY KEY, doc TEXT NOT NULL, lease_expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS generations (
    generation INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, source TEXT NOT NULL,
    digest TEXT NOT NULL, text TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS proxies (proxy_id TEXT PRIMARY KEY, doc TEXT NOT NULL);
"""


class SqliteStore(Store):
    """The embedded store: one SQLite file (mode 0600) in the state directory."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.exists():
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        self.path = path
        self.db = sqlite3.connect(path, timeout=10.0, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)

    # -- tokens ---------------------------------------------------------------------

    def _put_token(self, record: TokenRecord, digest: str) -> None:
        self.db.execute(
            "INSERT INTO tokens (token_id, service, digest, created, expires, single_use) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (
                record.token_id,
                record.service,
                digest,
                record.created,
                record.expires,
                record.single_use,
            ),
        )

    def _get_token(self, token_id: str) -> tuple[TokenRecord, str] | None:
        row = self.db.execute(
            "SELECT service, digest, created, expires, revoked, single_use, used "
            "FROM tokens WHERE token_id = ?",
            (token_id,),
        ).fetchone()
        if row is None:
            return None
        record = TokenRecord(
            token_id, row[0], row[2], row[3], bool(row[4]), bool(row[5]), bool(row[6])
        )
        return record, str(row[1])

    def use_token(self, token_id: str) -> None:
        self.db.execute("UPDATE tokens SET used = 1 WHERE token_id = ?", (token_id,))

    def revoke_token(self, token_id: str) -> bool:
        cur = self.db.execute("UPDATE tokens SET revoked = 1 WHERE token_id = ?", (token_id,))
        if cur.rowcount:
            self.audit("token-revoked", token_id=token_id)
        return bool(cur.rowcount)

    def tokens(self) -> list[TokenRecord]:
        rows = self.db.execute(
            "SELECT token_id, service, created, expires, revoked, single_use, used FROM tokens "
            "ORDER BY created"
        ).fetchall()
        return [
            TokenRecord(r[0], r[1], r[2], r[3], bool(r[4]), bool(r[5]), bool(r[6])) for r in rows
        ]

    # -- audit ------------------------------------------------------------------------

    def audit(self, event: str, **fields: Any) -> None:
        at = time.time()
        doc = json.dumps({"at": at, "event": event, **fields}, sort_keys=True)
        self.db.execute("INSERT INTO audit (at, event, doc) VALUES (?, ?, ?)", (at, event, doc))

    def audit_log(self, limit: int = 1000) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT doc FROM audit ORDER BY seq DESC LIMIT ?", (limit,)
        ).fetchall()
        return [json.loads(r[0]) for r in reversed(rows)]

    # -- instances ----------------------------------------------------------------------

    def put_instance(self, inst: Instance) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO instances (instance_id, doc, lease_expires) VALUES (?, ?, ?)",
            (inst.instance_id, json.dumps(inst.to_json()), inst.lease_expires),
        )

    def renew_lease(self, instance_id: str, expires: float) -> bool:
        row = self.db.execute(
            "SELECT doc FROM instances WHERE instance_id = ?", (instance_id,)
        ).fetchone()
        if row is None:
            return False
        doc = json.loads(row[0])
        doc["lease_expires"] = expires
        self.db.execute(
            "UPDATE instances SET doc = ?, lease_expires = ? WHERE instance_id = ?",
            (json.dumps(doc), expires, instance_id),
        )
        return True

    def remove_instance(self, instance_id: str) -> None:
        self.db.execute("DELETE FROM instances WHERE instance_id = ?", (instance_id,))

    def instances(self) -> list[Instance]:
        rows = self.db.execute("SELECT doc FROM instances ORDER BY instance_id").fetchall()
        return [Instance.from_json(json.loads(r[0])) for r in rows]

    # -- versions and generations ---------------------------------------------------------

    def next_version(self) -> int:
        """A version number never handed out before, restarts included."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            row = self.db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
            version = (int(row[0]) if row else 0) + 1
            self.db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('version', ?)", (str(version),)
            )
        return version

    def save_generation(self, text: str, source: str) -> int:
        digest = hashlib.sha256(text.encode()).hexdigest()
        last = self.db.execute(
            "SELECT generation, digest FROM generations ORDER BY generation DESC LIMIT 1"
        ).fetchone()
        if last is not None and last[1] == digest:
            return int(last[0])
        cur = self.db.execute(
            "INSERT INTO generations (at, source, digest, text) VALUES (?, ?, ?, ?)",
            (time.time(), source, digest, text),
        )
        generation = int(cur.lastrowid or 0)
        self.audit("generation", generation=generation, source=source, digest=digest)
        return generation

    def generations(self, limit: int = 20) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT generation, at, source, digest FROM generations "
            "ORDER BY generation DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [{"generation": r[0], "at": r[1], "source": r[2], "digest": r[3]} for r in rows]

    def generation_text(self, generation: int) -> str | None:
        row = self.db.execute(
            "SELECT text FROM generations WHERE generation = ?", (generation,)
        ).fetchone()
        return str(row[0]) if row else None

    # -- proxies -------------------------------------------------------------------------

    def put_proxy(self, proxy_id: str, state: dict[str, Any]) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO proxies (proxy_id, doc) VALUES (?, ?)",
            (proxy_id, json.dumps(state, sort_keys=True)),
        )

    def put_proxies(self, states: dict[str, dict[str, Any]]) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(
                "INSERT OR REPLACE INTO proxies (proxy_id, doc) VALUES (?, ?)",
                [(pid, json.dumps(s, sort_keys=True)) for pid, s in states.items()],
            )

    def proxies(self) -> dict[str, dict[str, Any]]:
        rows = self.db.execute("SELECT proxy_id, doc FROM proxies ORDER BY proxy_id").fetchall()
        return {r[0]: json.loads(r[1]) for r in rows}

    def close(self) -> None:
        self.db.close()
