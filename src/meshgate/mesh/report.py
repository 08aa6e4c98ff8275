"""What a proxy tells the control plane of its traffic: the `report` message.

Every `agent.REPORT_INTERVAL` seconds (2) the proxy's `MeshAgent` sends, on the push
stream it keeps, what its `Reporter` makes (docs/dashboard-api.md):

- `samples`: its own metrics (`MetricsHub.collect`, the very numbers its
  `/metrics` shows, cumulative), only the families the dashboard reads
  (`exposition.REPORT_FAMILIES`);
- `denials`: the denials of its authz filters since its previous report
  (`filters.authz.DenialRing`, at most 50).

The agent knows none of this: it calls the reporter, and sends what it
returns. `proxy_info` puts the proxy's id on its `/metrics` too
(`meshgate_proxy_info{proxy_id} 1`, one series per worker), so that a
Prometheus target can be told to be this proxy (`control.promsource`).
The control plane takes a report only as the word of the stream's
authenticated identity about itself (`mesh.control.reports`).
"""

from __future__ import annotations

import time
from typing import Any

from meshgate.filters.authz import DenialRing
from meshgate.observability.exposition import REPORT_FAMILIES
from meshgate.observability.hub import MetricsHub

__all__ = ["Reporter", "proxy_info"]


class Reporter:
    """One proxy's reports: its hub's samples and its new denials."""

    def __init__(self, hub: MetricsHub, denials: DenialRing, service: str) -> None:
        self.hub = hub
        self.denials = denials
        self.service = service
        """The proxy's own service: the destination of a denial whose policy
        names none (a gateway route's)."""
        self.seq = 0
        """The last denial already reported."""

    def __call__(self) -> dict[str, Any]:
        denials, self.seq = self.denials.since(self.seq)
        for d in denials:
            if not d["destination"]:
                d["destination"] = self.service
        return {
            "at": time.time(),
            # Not a scrape: with several workers, expiry stays the scrapes' to decide.
            "samples": self.hub.collect(REPORT_FAMILIES, scrape=False),
            "denials": denials,
        }


def proxy_info(hub: MetricsHub, proxy_id: str) -> None:
    """Report `meshgate_proxy_info{proxy_id} 1` in `hub`'s samples: this
    worker's id, the one of its push stream's hello."""
    hub.register("proxy_info", lambda: {"meshgate_proxy_info": [[(proxy_id,), 1]]})
