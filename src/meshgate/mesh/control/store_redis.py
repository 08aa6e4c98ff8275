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
import dataclasses
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from meshgate.mesh.control.store import Instance, Store, TokenRecord

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

    def _put_token(self, record: TokenRecord, digest: str) -> None:
        self.r.hset(
            _P + "tokens",
            record.token_id,
            json.dumps({**dataclasses.asdict(record), "digest": digest}),
        )

    def _token(self, token_id: str) -> dict[str, Any] | None:
        raw = self.r.hget(_P + "tokens", token_id)
        return json.loads(raw) if raw else None

    @staticmethod
    def _record(doc: dict[str, Any]) -> TokenRecord:
        return TokenRecord(**{k: v for k, v in doc.items() if k != "digest"})

    def _get_token(self, token_id: str) -> tuple[TokenRecord, str] | None:
        doc = self._token(token_id)
        return None if doc is None else (self._record(doc), str(doc["digest"]))

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
        records = [self._record(json.loads(v)) for v in docs.values()]
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
