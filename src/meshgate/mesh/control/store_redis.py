"""The control plane's state in Redis, for two or more `meshgate control`.

Same contract as `SqliteStore`. Every instance of the control plane reads and
writes the same keys (under `meshgate:cp:`), and tells the others of a
change on one pub/sub channel, so that whichever instance a proxy is
connected to pushes it: a registration on one reaches proxies on all.
Versions come from one `INCR`, so they never go back, whichever instance
hands them out.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from meshgate.mesh.control.store import (
    TOKEN_PREFIX,
    Instance,
    Store,
    TokenError,
    TokenRecord,
    _digest,
    _split_token,
)

__all__ = ["RedisStore"]

_P = "meshgate:cp:"
_CHANNEL = _P + "changes"
_AUDIT_MAX = 100_000


class RedisStore(Store):
    def __init__(self, url: str) -> None:
        self.r = redis.Redis.from_url(url, decode_responses=True, socket_timeout=5)
        self.r.ping()
        self.origin = secrets.token_hex(8)
        self._listener: threading.Thread | None = None
        self._pubsub: Any = None

    # -- change notification ------------------------------------------------------------

    def publish(self, what: str) -> None:
        self.r.publish(_CHANNEL, json.dumps({"origin": self.origin, "what": what}))

    def subscribe(self, callback: Callable[[str], None]) -> None:
        """Call `callback(what)` (from a thread) on another instance's change."""
        pubsub = self.r.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        pubsub.subscribe(_CHANNEL)
        self._pubsub = pubsub

        def listen() -> None:
            for msg in pubsub.listen():
                try:
                    doc = json.loads(msg["data"])
                except (ValueError, TypeError, KeyError):
                    continue
                if doc.get("origin") != self.origin:
                    callback(str(doc.get("what")))

        self._listener = threading.Thread(target=listen, name="meshgate-cp-pubsub", daemon=True)
        self._listener.start()

    # -- tokens ---------------------------------------------------------------------------

    def create_token(
        self, service: str, *, ttl: float | None = None, single_use: bool = False
    ) -> str:
        token_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        now = time.time()
        self.r.hset(
            _P + "tokens",
            token_id,
            json.dumps(
                {
                    "service": service,
                    "digest": _digest(secret),
                    "created": now,
                    "expires": now + ttl if ttl else None,
                    "revoked": False,
                    "single_use": single_use,
                    "used": False,
                }
            ),
        )
        self.audit("token-created", token_id=token_id, service=service, expires=ttl)
        return f"{TOKEN_PREFIX}{token_id}.{secret}"

    def _token(self, token_id: str) -> dict[str, Any] | None:
        raw = self.r.hget(_P + "tokens", token_id)
        return json.loads(raw) if raw else None

    @staticmethod
    def _record(token_id: str, doc: dict[str, Any]) -> TokenRecord:
        return TokenRecord(
            token_id,
            doc["service"],
            doc["created"],
            doc["expires"],
            doc["revoked"],
            doc["single_use"],
            doc["used"],
        )

    def check_token(self, token: str, now: float | None = None) -> TokenRecord:
        token_id, secret = _split_token(token)
        doc = self._token(token_id)
        if doc is None or not hmac.compare_digest(doc["digest"], _digest(secret)):
            raise TokenError("unknown token")
        record = self._record(token_id, doc)
        if record.revoked:
            raise TokenError(f"token {token_id} was revoked")
        if record.expires is not None and (now or time.time()) >= record.expires:
            raise TokenError(f"token {token_id} has expired")
        if record.single_use and record.used:
            raise TokenError(f"token {token_id} was already exchanged for a certificate")
        return record

    def _update_token(self, token_id: str, **fields: Any) -> bool:
        doc = self._token(token_id)
        if doc is None:
            return False
        doc.update(fields)
        self.r.hset(_P + "tokens", token_id, json.dumps(doc))
        return True

    def use_token(self, token_id: str) -> None:
        self._update_token(token_id, used=True)

    def revoke_token(self, token_id: str) -> bool:
        done = self._update_token(token_id, revoked=True)
        if done:
            self.audit("token-revoked", token_id=token_id)
        return done

    def tokens(self) -> list[TokenRecord]:
        docs: dict[str, str] = self.r.hgetall(_P + "tokens")  # type: ignore[assignment]
        records = [self._record(k, json.loads(v)) for k, v in docs.items()]
        return sorted(records, key=lambda t: t.created)

    # -- audit ----------------------------------------------------------------------------------

    def audit(self, event: str, **fields: Any) -> None:
        doc = json.dumps({"at": time.time(), "event": event, **fields}, sort_keys=True)
        pipe = self.r.pipeline()
        pipe.rpush(_P + "audit", doc)
        pipe.ltrim(_P + "audit", -_AUDIT_MAX, -1)
        pipe.execute()

    def audit_log(self, limit: int = 1000) -> list[dict[str, Any]]:
        return [json.loads(d) for d in self.r.lrange(_P + "audit", -limit, -1)]

    # -- instances ---------------------------------------------------------------------------------

    def put_instance(self, inst: Instance) -> None:
        self.r.hset(_P + "instances", inst.instance_id, json.dumps(inst.to_json()))
        self.publish("instance")

    def renew_lease(self, instance_id: str, expires: float) -> bool:
        raw = self.r.hget(_P + "instances", instance_id)
        if not raw:
            return False
        doc = json.loads(raw)
        doc["lease_expires"] = expires
        self.r.hset(_P + "instances", instance_id, json.dumps(doc))
        return True

    def remove_instance(self, instance_id: str) -> None:
        self.r.hdel(_P + "instances", instance_id)
        self.publish("instance")

    def instances(self) -> list[Instance]:
        docs = self.r.hgetall(_P + "instances")
        return [Instance.from_json(json.loads(docs[k])) for k in sorted(docs)]

    # -- versions and generations ------------------------------------------------------

    def next_version(self) -> int:
        return int(self.r.incr(_P + "version"))

    def save_generation(self, text: str, source: str) -> int:
        digest = hashlib.sha256(text.encode()).hexdigest()
        last = self.r.lindex(_P + "generations", -1)
        if last is not None and json.loads(last)["digest"] == digest:
            return int(json.loads(last)["generation"])
        generation = int(self.r.incr(_P + "generation"))
        doc = {"generation": generation, "at": time.time(), "source": source, "digest": digest}
        pipe = self.r.pipeline()
        pipe.rpush(_P + "generations", json.dumps(doc))
        pipe.hset(_P + "generation-text", str(generation), text)
        pipe.execute()
        self.audit("generation", generation=generation, source=source, digest=digest)
        self.publish("generation")
        return generation

    def generation_text(self, generation: int) -> str | None:
        text = self.r.hget(_P + "generation-text", str(generation))
        return str(text) if text is not None else None

    def generations(self, limit: int = 20) -> list[dict[str, Any]]:
        docs = [json.loads(d) for d in self.r.lrange(_P + "generations", -limit, -1)]
        return list(reversed(docs))

    # -- proxies -----------------------------------------------------------------------

    def put_proxy(self, proxy_id: str, state: dict[str, Any]) -> None:
        self.r.hset(_P + "proxies", proxy_id, json.dumps(state, sort_keys=True))

    def put_proxies(self, states: dict[str, dict[str, Any]]) -> None:
        if states:
            self.r.hset(
                _P + "proxies",
                mapping={k: json.dumps(v, sort_keys=True) for k, v in states.items()},
            )

    def proxies(self) -> dict[str, dict[str, Any]]:
        docs: dict[str, str] = self.r.hgetall(_P + "proxies")  # type: ignore[assignment]
        return {k: json.loads(docs[k]) for k in sorted(docs)}

    def close(self) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                self._pubsub.close()
        self.r.close()
