"""Which destinations an instance goes to: rules, evaluated once, when it is received.

A :class:`RoutingTable` is an ordered list of :class:`Rule`; each rule is a filter (every
condition must hold) and the names of the destinations it sends to. With ``first``
matching (the default) the first rule that matches decides; with ``all`` every matching
rule adds its destinations. When no rule matches, the table's default destination gets the
instance; without a default the instance is *unrouted*: kept and visible, never dropped.

A condition tests one thing about the arrival (:class:`Arrival`): a top-level attribute of
the data set (by keyword or tag), the calling or called AE title, or the peer's address.
Matchers are plain objects with one method, ``matches(values)``, over the tested thing's
values as strings; an absent or empty value never matches a positive matcher (so
``Not(...)`` of one does), and a multi-valued attribute matches when any of its values does,
as in DICOM C-FIND and in dcm4che's ``Attributes.matches``, which Google's adapter uses.

The parsing of destinations files (ours and Google's format) lives with the commands; this
module only evaluates.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Protocol

from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag


class Matching(StrEnum):
    """How many rules may send an instance somewhere."""

    FIRST = "first"  #: the first matching rule decides
    ALL = "all"  #: every matching rule adds its destinations


class Subject(StrEnum):
    """What a condition tests besides data set attributes."""

    CALLING_AET = "calling_aet"
    CALLED_AET = "called_aet"
    PEER = "peer"


@dataclass(frozen=True)
class Arrival:
    """What routing can see of one received instance.

    ``attribute(tag)`` gives a top-level attribute's values as strings (empty when absent);
    it is called only for the tags some rule tests, so a receiver can read lazily.
    """

    attribute: Callable[[BaseTag], tuple[str, ...]]
    calling_aet: str
    called_aet: str
    peer_address: str

    def values(self, subject: Subject | BaseTag) -> tuple[str, ...]:
        if subject == Subject.CALLING_AET:
            return (self.calling_aet,)
        if subject == Subject.CALLED_AET:
            return (self.called_aet,)
        if subject == Subject.PEER:
            return (self.peer_address,)
        assert isinstance(subject, BaseTag)
        return self.attribute(subject)


def dataset_attributes(dataset: Dataset) -> Callable[[BaseTag], tuple[str, ...]]:
    """``Arrival.attribute`` over a pydicom data set: top-level elements only (a tag
    nested in a sequence is not an attribute of the instance), each value as the string
    pydicom gives it (multi-valued elements give one string per value)."""

    def attribute(tag: BaseTag) -> tuple[str, ...]:
        element = dataset.get(tag)
        if element is None or element.VR == "SQ" or element.is_empty:
            return ()
        value = element.value
        items: Iterable[object] = value if element.VM > 1 else (value,)
        return tuple(str(item) for item in items if item is not None and str(item) != "")

    return attribute


class Matcher(Protocol):
    """Decides on the values of what a condition tests."""

    def matches(self, values: Sequence[str]) -> bool: ...

    def describe(self) -> str: ...


def _any_nonempty(values: Sequence[str], test: Callable[[str], bool]) -> bool:
    """The one rule every positive matcher follows: absent or empty never matches, and a
    multi-valued attribute matches when any of its values does."""
    return any(test(value) for value in values if value != "")


@dataclass(frozen=True)
class Equals:
    """Exact, case-sensitive."""

    value: str

    def matches(self, values: Sequence[str]) -> bool:
        return _any_nonempty(values, lambda v: v == self.value)

    def describe(self) -> str:
        return f"= {self.value!r}"


@dataclass(frozen=True)
class Wildcard:
    """DICOM C-FIND wildcards: ``*`` any run of characters (none included), ``?`` exactly
    one; everything else literal and case-sensitive."""

    pattern: str

    @cached_property
    def _regex(self) -> re.Pattern[str]:
        parts = ("." if c == "?" else ".*" if c == "*" else re.escape(c) for c in self.pattern)
        return re.compile("".join(parts), re.DOTALL)

    def matches(self, values: Sequence[str]) -> bool:
        return _any_nonempty(values, lambda v: self._regex.fullmatch(v) is not None)

    def describe(self) -> str:
        return f"like {self.pattern!r}"


@dataclass(frozen=True)
class Regex:
    """A Python regular expression that must match the whole value."""

    pattern: str

    @cached_property
    def _regex(self) -> re.Pattern[str]:
        return re.compile(self.pattern)

    def matches(self, values: Sequence[str]) -> bool:
        return _any_nonempty(values, lambda v: self._regex.fullmatch(v) is not None)

    def describe(self) -> str:
        return f"~ /{self.pattern}/"


@dataclass(frozen=True)
class InNetwork:
    """An IP address inside one of the networks (for the peer address)."""

    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    def matches(self, values: Sequence[str]) -> bool:
        def inside(value: str) -> bool:
            try:
                address = ipaddress.ip_address(value)
            except ValueError:
                return False
            return any(address in network for network in self.networks)

        return _any_nonempty(values, inside)

    def describe(self) -> str:
        return "in " + ", ".join(str(n) for n in self.networks)


@dataclass(frozen=True)
class AnyOf:
    """Matches when one of the matchers does (Google's ``\\`` between values)."""

    matchers: tuple[Matcher, ...]

    def matches(self, values: Sequence[str]) -> bool:
        return any(m.matches(values) for m in self.matchers)

    def describe(self) -> str:
        return "any of (" + "; ".join(m.describe() for m in self.matchers) + ")"


@dataclass(frozen=True)
class Not:
    """Negation: holds exactly when the inner matcher does not (so it holds for an absent
    attribute)."""

    matcher: Matcher

    def matches(self, values: Sequence[str]) -> bool:
        return not self.matcher.matches(values)

    def describe(self) -> str:
        return f"not {self.matcher.describe()}"


def dicom_value_matcher(value: str) -> Matcher:
    """A value as C-FIND (and dcm4che, and so Google's filters) reads it: wildcards when it
    has ``*`` or ``?``, else exact."""
    return Wildcard(value) if ("*" in value or "?" in value) else Equals(value)


_TAG = re.compile(r"^\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?$")


def parse_subject(key: str) -> Subject | BaseTag:
    """``calling_aet``/``called_aet``/``peer``, a keyword (``Modality``), or a tag written
    ``(0008,0060)``, ``0008,0060`` or ``00080060``. Raises ValueError naming the key."""
    if key in Subject.__members__.values():
        return Subject(key)
    found = _TAG.match(key)
    if found:
        return Tag(int(found.group(1) + found.group(2), 16))
    tag = tag_for_keyword(key) if key.isidentifier() else None  # pydicom maps "" to a tag
    if tag is None:
        raise ValueError(f"{key!r} is neither a DICOM keyword nor a tag like (0008,0060)")
    return Tag(tag)


def subject_name(subject: Subject | BaseTag) -> str:
    if isinstance(subject, Subject):
        return subject.value
    keyword = keyword_for_tag(subject)
    tag = f"({subject.group:04X},{subject.element:04X})"
    return f"{keyword} {tag}" if keyword else tag


@dataclass(frozen=True)
class Condition:
    """One test: the subject's values against a matcher."""

    subject: Subject | BaseTag
    matcher: Matcher

    def holds(self, arrival: Arrival) -> bool:
        return self.matcher.matches(arrival.values(self.subject))

    def describe(self) -> str:
        return f"{subject_name(self.subject)} {self.matcher.describe()}"


@dataclass(frozen=True)
class Rule:
    """Every condition must hold (no conditions: always); then the instance goes to each
    of ``destinations``."""

    name: str
    conditions: tuple[Condition, ...]
    destinations: tuple[str, ...]

    def matches(self, arrival: Arrival) -> bool:
        return all(condition.holds(arrival) for condition in self.conditions)


@dataclass(frozen=True)
class Route:
    """Where one instance goes, and why (for its history and the log)."""

    destinations: tuple[str, ...]
    rules: tuple[str, ...]  #: the rules that matched, in order
    by_default: bool = False

    @property
    def unrouted(self) -> bool:
        return not self.destinations


class NeedsAssociation(ValueError):
    """A route that depends on what only the association knew (calling or called AE title,
    peer address), asked for without it."""

    def __init__(self, rule: str, subjects: tuple[Subject, ...]) -> None:
        self.rule = rule
        self.subjects = subjects
        tested = " and ".join(s.value for s in subjects)
        super().__init__(f"rule {rule!r} tests {tested}, which only the association knew")


@dataclass(frozen=True)
class RoutingTable:
    """Rules in order, how many may match, and the destination for what matches none."""

    rules: tuple[Rule, ...] = ()
    matching: Matching = Matching.FIRST
    default: str | None = None
    destination_names: frozenset[str] = field(default=frozenset())

    def __post_init__(self) -> None:
        known = self.destination_names
        if not known:
            return
        for rule in self.rules:
            for name in rule.destinations:
                if name not in known:
                    raise ValueError(f"rule {rule.name!r}: no destination named {name!r}")
        if self.default is not None and self.default not in known:
            raise ValueError(f"default: no destination named {self.default!r}")

    @classmethod
    def single(cls, destination: str) -> RoutingTable:
        """One destination and no rules: what ``--dicomweb-url`` alone means."""
        return cls(default=destination, destination_names=frozenset({destination}))

    def route(self, arrival: Arrival) -> Route:
        matched: list[Rule] = []
        for rule in self.rules:
            if rule.matches(arrival):
                matched.append(rule)
                if self.matching == Matching.FIRST:
                    break
        return self._route_of(matched)

    def route_without_association(self, attribute: Callable[[BaseTag], tuple[str, ...]]) -> Route:
        """The route from the data set alone, for an instance whose association is unknown
        (an orphan spool file that ``reconcile --adopt`` queues).

        Raises :class:`NeedsAssociation` when the route could depend on the calling or
        called AE title or the peer: a rule that tests one of them and whose data set
        conditions hold, reached (with ``first`` matching: before a rule that matches).
        Guessing there could send the instance where its receipt would not have (say, a
        research store for one sender only), so no guess is made.
        """
        arrival = Arrival(attribute=attribute, calling_aet="", called_aet="", peer_address="")
        matched: list[Rule] = []
        for rule in self.rules:
            on_dataset = [c for c in rule.conditions if not isinstance(c.subject, Subject)]
            if not all(condition.holds(arrival) for condition in on_dataset):
                continue  # false whatever the association was
            unknown = [c.subject for c in rule.conditions if isinstance(c.subject, Subject)]
            if unknown:
                raise NeedsAssociation(rule.name, tuple(dict.fromkeys(unknown)))
            matched.append(rule)
            if self.matching == Matching.FIRST:
                break
        return self._route_of(matched)

    def _route_of(self, matched: Sequence[Rule]) -> Route:
        """The route when exactly ``matched`` matched."""
        if not matched:
            if self.default is None:
                return Route(destinations=(), rules=())
            return Route(destinations=(self.default,), rules=(), by_default=True)
        names: dict[str, None] = {}  # ordered, without repeats
        for rule in matched:
            names.update(dict.fromkeys(rule.destinations))
        return Route(destinations=tuple(names), rules=tuple(r.name for r in matched))

    @cached_property
    def tested_tags(self) -> frozenset[BaseTag]:
        """The data set tags some rule tests: a receiver need read no others."""
        return frozenset(
            c.subject for r in self.rules for c in r.conditions if isinstance(c.subject, BaseTag)
        )
