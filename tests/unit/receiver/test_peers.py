"""The calling-AE / source-address allow-list (``--allowed-peers``, ``--allowed-calling-aets``)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from pydicom.dataset import Dataset

from stowaway.cli import build_parser
from stowaway.receiver.peers import PeerPolicy, parse_rule, parse_rules
from stowaway.receiver.scp import Receiver, ReceiverConfig
from stowaway.settings import SettingsError, load_settings


def policy(peers: str = "", aets: tuple[str, ...] = ()) -> PeerPolicy:
    return PeerPolicy.from_settings([str(r) for r in parse_rules(peers)], aets)


def test_parse_entries() -> None:
    rules = parse_rules(" MODALITY1@10.20.0.0/16, *@192.168.7.7 ,PACS@fd00::/8,")
    assert [str(r) for r in rules] == [
        "MODALITY1@10.20.0.0/16",
        "*@192.168.7.7/32",
        "PACS@fd00::/8",
    ]
    # An AE title may itself contain "@": the network is after the last one.
    assert str(parse_rule("A@B@10.0.0.0/8")) == "A@B@10.0.0.0/8"


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ("MODALITY1", "is not AE@CIDR"),
        ("@10.0.0.0/8", "is not AE@CIDR"),
        ("MODALITY1@", "is not AE@CIDR"),
        ("MODALITY1@pacs.example.org", "is not an IP address or network"),
        ("MODALITY1@10.0.0.7/24", "did you mean 10.0.0.0/24"),
        ("MODALITY1@10.0.0.0/33", "is not an IP address or network"),
        ("THIS_TITLE_IS_FAR_TOO_LONG@10.0.0.0/8", "is not an AE title"),
        ("BACK\\SLASH@10.0.0.0/8", "is not an AE title"),
    ],
)
def test_bad_entries_say_what_is_wrong(entry: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_rule(entry)


def test_no_lists_admit_everyone() -> None:
    p = policy()
    assert p.open
    assert p.address_admitted("203.0.113.9")
    assert p.calling_aets_for("203.0.113.9") is None
    assert p.refusal("ANYONE", "203.0.113.9") is None


def test_ae_bound_to_network() -> None:
    p = policy("CT1@10.20.0.0/16,MR1@10.30.0.5")
    assert p.refusal("CT1", "10.20.1.2") is None
    assert p.refusal("MR1", "10.30.0.5") is None
    assert p.refusal("CT1", "10.30.0.5") == "calling AE title not allowed from this address"
    assert p.refusal("MR1", "10.30.0.6") == "source address not in the allow-list"
    assert p.refusal("NOBODY", "10.20.1.2") == "calling AE title not allowed"
    assert p.calling_aets_for("10.20.9.9") == ("CT1",)
    assert p.calling_aets_for("10.30.0.5") == ("MR1",)
    assert p.calling_aets_for("192.0.2.1") == ()
    assert p.address_admitted("10.20.255.255")
    assert not p.address_admitted("10.21.0.1")


def test_wildcard_ae_admits_any_title_from_its_network() -> None:
    p = policy("*@10.20.0.0/16,CT1@10.30.0.0/16")
    assert p.calling_aets_for("10.20.0.1") is None
    assert p.refusal("WHATEVER", "10.20.0.1") is None
    assert p.refusal("WHATEVER", "10.30.0.1") == "calling AE title not allowed"


def test_allowed_calling_aets_are_from_anywhere_and_add_up() -> None:
    p = policy("CT1@10.20.0.0/16", aets=("PACS",))
    assert p.refusal("PACS", "198.51.100.4") is None
    assert p.refusal("PACS", "2001:db8::1") is None
    assert p.refusal("CT1", "10.20.0.1") is None
    assert p.refusal("CT1", "198.51.100.4") == "calling AE title not allowed from this address"
    assert set(p.calling_aets_for("10.20.0.1") or ()) == {"CT1", "PACS"}
    assert p.address_admitted("198.51.100.4")


def test_ipv6_and_ipv4_mapped_addresses() -> None:
    p = policy("CT1@10.20.0.0/16,MR1@fd00:1::/64")
    # A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d.
    assert p.refusal("CT1", "::ffff:10.20.3.4") is None
    assert p.refusal("MR1", "fd00:1::42") is None
    assert p.refusal("MR1", "fe80::1%eth0") == "source address not in the allow-list"
    # An IPv4 network never matches an IPv6 address and vice versa.
    assert not p.address_admitted("::a14:304")


def test_not_an_address_is_refused() -> None:
    p = policy("CT1@10.20.0.0/16")
    assert not p.address_admitted("not-an-address")
    assert p.refusal("CT1", "not-an-address") == "source address not in the allow-list"


def test_setting_is_normalised_and_errors_name_the_flag() -> None:
    parser = build_parser()
    s = load_settings(
        parser.parse_args(["receive", "--allowed-peers", "CT1@10.20.0.0/16, *@10.9.9.9"]), {}
    )
    assert s.allowed_peers == ("CT1@10.20.0.0/16", "*@10.9.9.9/32")
    s = load_settings(parser.parse_args(["receive"]), {"STOWAWAY_ALLOWED_PEERS": "MR@fd00::/8"})
    assert s.allowed_peers == ("MR@fd00::/8",)
    with pytest.raises(SettingsError, match=r"^--allowed-peers: 'CT1' is not AE@CIDR"):
        load_settings(parser.parse_args(["receive", "--allowed-peers", "CT1"]), {})
    with pytest.raises(SettingsError, match=r"^STOWAWAY_ALLOWED_PEERS: .*did you mean"):
        load_settings(parser.parse_args(["receive"]), {"STOWAWAY_ALLOWED_PEERS": "A@10.0.0.1/8"})


def test_c_store_from_a_refused_peer_is_not_stored(tmp_path: Path) -> None:
    """The last line of defence, should negotiation ever let such a peer through."""

    def handler(_event: object) -> int:
        raise AssertionError("the store handler must not run")

    receiver = Receiver(
        ReceiverConfig(port=0, allowed_peers=("CT1@10.20.0.0/16",)),
        handler,  # type: ignore[arg-type]
        str(tmp_path),
    )
    requestor = SimpleNamespace(ae_title="CT1", address="192.0.2.7")
    event = SimpleNamespace(assoc=SimpleNamespace(requestor=requestor))
    status = receiver._on_c_store(event)  # type: ignore[arg-type]
    assert isinstance(status, Dataset)
    assert status.Status == 0x0124
