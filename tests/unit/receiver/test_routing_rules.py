"""Routing rules: which destinations an arrival goes to, and the matching semantics that
every rule shares (absent never matches, any value of a multi-valued attribute may)."""

from __future__ import annotations

import ipaddress

import pytest
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from stowaway.receiver.routing import (
    AnyOf,
    Arrival,
    Condition,
    Equals,
    InNetwork,
    Matching,
    NeedsAssociation,
    Not,
    Regex,
    RoutingTable,
    Rule,
    Subject,
    Wildcard,
    dataset_attributes,
    dicom_value_matcher,
    parse_subject,
)


def arrival(
    calling: str = "CT1", called: str = "STOWAWAY", peer: str = "10.1.2.3", **attrs: object
) -> Arrival:
    ds = Dataset()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return Arrival(dataset_attributes(ds), calling, called, peer)


def rule(name: str, to: str, **when: object) -> Rule:
    conditions = tuple(
        Condition(parse_subject(key), m if not isinstance(m, str) else dicom_value_matcher(m))
        for key, m in when.items()
    )
    return Rule(name, conditions, (to,))


def test_wildcards_are_dicoms_star_and_question_mark_and_nothing_else() -> None:
    assert Wildcard("CT*").matches(["CT", "CTA"])
    assert Wildcard("C?").matches(["CT"]) and not Wildcard("C?").matches(["C"])
    assert not Wildcard("C.*").matches(["CTA"])  # regex characters are literal
    assert not Wildcard("ct*").matches(["CT"])  # case-sensitive


def test_an_absent_or_empty_attribute_never_matches_a_positive_matcher() -> None:
    for matcher in (Equals(""), Wildcard("*"), Regex(".*"), AnyOf((Wildcard("*"),))):
        assert not matcher.matches([]), matcher
        assert not matcher.matches([""]), matcher
    assert Not(Wildcard("*")).matches([])  # so a negation holds for it


def test_a_multi_valued_attribute_matches_when_any_value_does() -> None:
    a = arrival(ImageType=["ORIGINAL", "PRIMARY", "AXIAL"])
    assert Condition(parse_subject("ImageType"), Equals("AXIAL")).holds(a)
    assert not Condition(parse_subject("ImageType"), Equals("LOCALIZER")).holds(a)


def test_subjects_by_keyword_tag_or_name() -> None:
    assert parse_subject("Modality") == Tag(0x00080060)
    assert parse_subject("(0008,0060)") == parse_subject("00080060") == Tag(0x00080060)
    assert parse_subject("calling_aet") is Subject.CALLING_AET
    for wrong in ("Modalty", "", "(0008,006)"):
        with pytest.raises(ValueError, match="neither a DICOM keyword"):
            parse_subject(wrong)


def test_peer_networks_and_regexes() -> None:
    in_net = InNetwork((ipaddress.ip_network("10.1.0.0/16"),))
    assert in_net.matches(["10.1.200.7"]) and not in_net.matches(["10.2.0.1", "not-an-ip"])
    assert Regex(r"CT\d+").matches(["CT12"]) and not Regex(r"CT\d+").matches(["xCT12"])


def test_nested_attributes_are_not_attributes_of_the_instance() -> None:
    inner = Dataset()
    inner.Modality = "MR"
    a = arrival(Modality="CT")
    ds = Dataset()
    ds.Modality = "CT"
    ds.ReferencedStudySequence = [inner]
    attrs = dataset_attributes(ds)
    assert attrs(Tag(0x00080060)) == ("CT",)
    assert attrs(Tag(0x00081110)) == ()  # a sequence is not a value to match
    assert a.values(Subject.PEER) == ("10.1.2.3",)


def test_first_matching_rule_decides_by_default() -> None:
    table = RoutingTable(
        (rule("mg", "research", Modality="MG"), rule("all-ct", "clinical", Modality="CT*")),
        default="clinical",
    )
    assert table.route(arrival(Modality="MG")).destinations == ("research",)
    assert table.route(arrival(Modality="CTA")).rules == ("all-ct",)


def test_all_matching_rules_add_their_destinations_once_each() -> None:
    table = RoutingTable(
        (
            rule("mg", "research", Modality="MG"),
            rule("from-ct1", "clinical", calling_aet="CT1"),
            rule("mg-again", "research", Modality="M?"),
        ),
        matching=Matching.ALL,
    )
    route = table.route(arrival(Modality="MG", calling="CT1"))
    assert route.destinations == ("research", "clinical")
    assert route.rules == ("mg", "from-ct1", "mg-again")


def test_no_rule_matching_goes_to_the_default_or_stays_unrouted() -> None:
    rules = (rule("mg", "research", Modality="MG"),)
    with_default = RoutingTable(rules, default="clinical").route(arrival(Modality="CT"))
    assert with_default.destinations == ("clinical",) and with_default.by_default
    unrouted = RoutingTable(rules).route(arrival(Modality="CT"))
    assert unrouted.unrouted and unrouted.destinations == ()


def test_a_rule_naming_an_unknown_destination_is_refused() -> None:
    with pytest.raises(ValueError, match="no destination named 'nowhere'"):
        RoutingTable((rule("x", "nowhere"),), destination_names=frozenset({"clinical"}))


def test_single_destination_routes_everything_there() -> None:
    assert RoutingTable.single("default").route(arrival()).destinations == ("default",)


def test_the_table_knows_which_tags_its_rules_read() -> None:
    table = RoutingTable(
        (rule("a", "x", Modality="MG", calling_aet="A"), rule("b", "x", StudyDescription="*"))
    )
    assert table.tested_tags == {Tag(0x00080060), Tag(0x00081030)}


def header(**attrs: object) -> Arrival:
    return arrival(calling="", called="", peer="", **attrs)


def test_without_the_association_a_route_that_could_depend_on_it_is_not_guessed() -> None:
    first = RoutingTable(
        (
            rule("mg", "research", Modality="MG"),
            rule("not-test", "research", Modality="CT", calling_aet=Not(Equals("TEST"))),
            rule("ct", "clinical", Modality="CT"),
        ),
        default="clinical",
    )
    # a rule before it decides, or its data set conditions fail: the route is known
    assert first.route_without_association(header(Modality="MG").attribute).rules == ("mg",)
    assert first.route_without_association(header(Modality="MR").attribute).by_default
    # reached and its data set conditions hold: the blank calling AE title would match
    # the `not`, so it is refused rather than evaluated
    with pytest.raises(NeedsAssociation, match="'not-test' tests calling_aet"):
        first.route_without_association(header(Modality="CT").attribute)
    every = RoutingTable(
        (rule("mg", "research", Modality="MG"), rule("peer", "clinical", peer="10.*")),
        matching=Matching.ALL,
    )
    with pytest.raises(NeedsAssociation, match="tests peer"):
        every.route_without_association(header(Modality="MG").attribute)
