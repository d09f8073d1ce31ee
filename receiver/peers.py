"""Who may send: calling AE titles, optionally bound to the source address.

Two settings feed one :class:`PeerPolicy`:

* ``--allowed-calling-aets A,B``: these calling AE titles, from any address;
* ``--allowed-peers AE@CIDR,...``: this calling AE title, only from this network
  (``*@CIDR``: any AE title from that network).

An association is admitted when any entry matches its (calling AE, source address);
with neither setting, everyone is. Entries add up: ``--allowed-calling-aets X``
is the same as ``--allowed-peers X@0.0.0.0/0,X@::/0``.

The policy answers two questions, asked at two moments by :mod:`receiver.scp`:
:meth:`PeerPolicy.address_admitted` when the TCP connection arrives (a source no
entry covers is closed before anything else happens: no TLS handshake, no slot
held), and :meth:`PeerPolicy.calling_aets_for` during A-ASSOCIATE negotiation
(the AE titles that source may use; pynetdicom rejects any other with a proper
A-ASSOCIATE-RJ "calling AE title not recognised").
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Stands for "any calling AE title" in an ``--allowed-peers`` entry.
ANY_AET: Final = "*"

_EVERYWHERE: Final[tuple[IPNetwork, ...]] = (
    ipaddress.ip_network("0.0.0.0/0"),
    ipaddress.ip_network("::/0"),
)


@dataclass(frozen=True)
class PeerRule:
    """One allow-list entry: a calling AE title (or ``*``) from a network."""

    aet: str
    network: IPNetwork

    def __str__(self) -> str:
        return f"{self.aet}@{self.network}"

    def admits(self, aet: str, address: IPAddress) -> bool:
        return self.network_admits(address) and self.aet in (ANY_AET, aet)

    def network_admits(self, address: IPAddress) -> bool:
        return address.version == self.network.version and address in self.network


def _check_aet(value: str) -> str:
    aet = value.strip()
    if aet == ANY_AET:
        return aet
    if not 1 <= len(aet) <= 16 or "\\" in aet or not aet.isprintable():
        raise ValueError(f"{value!r} is not an AE title (1 to 16 printable characters, or *)")
    return aet


def _check_network(value: str) -> IPNetwork:
    text = value.strip()
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            suggestion = ipaddress.ip_network(text, strict=False)
            raise ValueError(f"{text} has host bits set; did you mean {suggestion}?") from None
        raise ValueError(
            f"{text!r} is not an IP address or network (e.g. 10.20.0.0/16, 10.20.0.7, fd00::/8)"
        ) from None


def parse_rule(entry: str) -> PeerRule:
    """``AE@CIDR`` (or ``*@CIDR``; a bare address means that one host)."""
    aet, at, network = entry.strip().rpartition("@")
    if not at or not aet.strip() or not network.strip():
        raise ValueError(f"{entry.strip()!r} is not AE@CIDR (e.g. MODALITY1@10.20.0.0/16)")
    return PeerRule(_check_aet(aet), _check_network(network))


def parse_rules(value: str) -> tuple[PeerRule, ...]:
    """A comma-separated list of ``AE@CIDR`` entries; ValueError names the bad one."""
    return tuple(parse_rule(entry) for entry in value.split(",") if entry.strip())


def parse_address(address: str) -> IPAddress | None:
    """The peer's IP address as the socket reports it; IPv4-mapped IPv6 becomes IPv4.

    ``None`` for something that is not an IP address (never expected from TCP).
    """
    try:
        parsed = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return parsed.ipv4_mapped
    return parsed


class PeerPolicy:
    """The combined allow-list; immutable, so safe to read from any thread."""

    def __init__(
        self, rules: Iterable[PeerRule] = (), any_address_aets: Iterable[str] = ()
    ) -> None:
        self.rules: tuple[PeerRule, ...] = tuple(rules) + tuple(
            PeerRule(aet, network) for aet in any_address_aets for network in _EVERYWHERE
        )

    @classmethod
    def from_settings(
        cls, allowed_peers: Iterable[str], allowed_calling_aets: Iterable[str]
    ) -> PeerPolicy:
        """Build from the ``AE@CIDR`` strings and the plain AE title list."""
        return cls([parse_rule(p) for p in allowed_peers], allowed_calling_aets)

    @property
    def open(self) -> bool:
        """True when no allow-list is configured: anyone may send."""
        return not self.rules

    def address_admitted(self, address: str) -> bool:
        """Could any entry admit a connection from ``address``?"""
        if self.open:
            return True
        parsed = parse_address(address)
        return parsed is not None and any(r.network_admits(parsed) for r in self.rules)

    def calling_aets_for(self, address: str) -> tuple[str, ...] | None:
        """The calling AE titles ``address`` may use; ``None`` means any."""
        if self.open:
            return None
        parsed = parse_address(address)
        if parsed is None:
            return ()
        matching = [r for r in self.rules if r.network_admits(parsed)]
        if any(r.aet == ANY_AET for r in matching):
            return None
        return tuple(dict.fromkeys(r.aet for r in matching))

    def refusal(self, aet: str, address: str) -> str | None:
        """Why (``aet``, ``address``) is refused, or ``None`` when it is admitted."""
        if self.open:
            return None
        parsed = parse_address(address)
        if parsed is None or not any(r.network_admits(parsed) for r in self.rules):
            return "source address not in the allow-list"
        if any(r.admits(aet, parsed) for r in self.rules):
            return None
        if any(r.aet == aet for r in self.rules):
            return "calling AE title not allowed from this address"
        return "calling AE title not allowed"
