"""uvicorn's h11 protocol with a header deadline and a cap on connections that are not in a request.

A connection is *pending* from accept until its request headers are complete, and again while it idles
between keep-alive requests. Pending connections hold no request slot, and each client address may keep
at most `per_client` of them (all clients together `total`): past the cap the oldest pending one that has
had `GRACE_S` to send its headers is closed, connections that never sent a request before idle ones. So
sockets that trickle headers (slowloris) cannot lock real requests out, while a real request, whose
headers arrive in milliseconds, is never the one shed (unless one address opens connections faster than
`HARD_FACTOR * per_client` per `GRACE_S`: then the oldest pending one goes).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

GRACE_S = 0.25  # a pending connection younger than this is not shed while the cap is at most HARD_FACTOR x over
HARD_FACTOR = 4


@dataclass
class _Group:
    """Pending connections of one client (or of all): those opening (no request yet) and those idle
    between keep-alive requests, each oldest first. Opening ones are shed first: a client reusing an
    idle connection would see its request reset."""

    opening: OrderedDict = field(default_factory=OrderedDict)  # protocol -> since
    idle: OrderedDict = field(default_factory=OrderedDict)

    def __len__(self) -> int:
        return len(self.opening) + len(self.idle)

    def victim(self, cap: int, now: float) -> Any:
        """The connection to shed to get back to `cap`, or None to wait (all are young, not far over)."""
        if len(self) <= cap:
            return None
        order = self.opening or self.idle  # idle ones only once no opening one is left
        if now - next(iter(order.values())) >= GRACE_S or len(self) > HARD_FACTOR * cap:
            return next(iter(order))
        return None


@dataclass
class Pending:
    """Pending connections, overall and per client address (see the module docstring)."""

    per_client: int = 16
    total: int = 128
    everyone: _Group = field(default_factory=_Group)
    by_client: dict[str, _Group] = field(default_factory=dict)
    address: dict = field(default_factory=dict)  # protocol -> client address
    shed: int = 0  # connections closed for the cap, since start

    def add(self, conn: Any, address: str, idle: bool = False) -> None:
        self.discard(conn)
        now = time.monotonic()
        mine = self.by_client.setdefault(address, _Group())
        for group in (mine, self.everyone):
            (group.idle if idle else group.opening)[conn] = now
        self.address[conn] = address
        for group, cap in ((mine, self.per_client), (self.everyone, self.total)):
            while (victim := group.victim(cap, now)) is not None:
                self.discard(victim)
                self.shed += 1
                victim.transport.close()

    def discard(self, conn: Any) -> None:
        address = self.address.pop(conn, None)
        if address is None:
            return
        mine = self.by_client[address]
        for group in (mine, self.everyone):
            group.opening.pop(conn, None)
            group.idle.pop(conn, None)
        if not len(mine):
            del self.by_client[address]


def protocol_class(header_timeout: float, pending: Pending) -> type:
    """The h11 protocol class for uvicorn: headers must arrive within `header_timeout` seconds of the
    connection (or of the last response), and pending connections are capped by `pending`."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._pending()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                pending.discard(self)  # headers complete: a request now

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._pending()

        def connection_lost(self, exc: Exception | None) -> None:
            pending.discard(self)
            super().connection_lost(exc)

        def _pending(self) -> None:
            cycle = self.cycle  # a new request replaces it; then the deadline is void

            def expire() -> None:
                idle = cycle is None or cycle.response_complete
                if self.cycle is cycle and idle and not self.transport.is_closing():
                    pending.discard(self)
                    self.transport.close()
            self.loop.call_later(header_timeout, expire)
            pending.add(self, self.client[0] if self.client else "?", idle=cycle is not None)

    return Protocol
