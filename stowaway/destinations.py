"""Destinations and routing rules from a file, ours or Google's adapter's.

Two formats, one result (:class:`DestinationConfig`: the destinations and the routing
table):

* ``--destinations FILE`` (YAML or JSON), stowaway's own::

      destinations:
        - {name: clinical, kind: dicomweb, url: "https://healthcare.googleapis.com/v1/.../dicomWeb"}
        - {name: research, kind: dicomweb, url: "http://127.0.0.1:8042/dicom-web", auth: none}
        - {name: pacs, kind: dimse, host: 127.0.0.1, port: 104, called_aet: PACS}
        - name: teaching
          kind: dicomweb
          url: "http://127.0.0.1:8043/dicom-web"
          redact: {profile: DICOM_BASIC, uid_key_file: /run/secrets/uid-key}
          transcode: 1.2.840.10008.1.2.4.90
      matching: first          # or all
      default: clinical        # what matches no rule; without it: unrouted, kept
      rules:
        - name: mammography
          when: {Modality: MG, calling_aet: {not: "TEST*"}, peer: {in_network: 10.1.0.0/16}}
          to: [research, clinical]

  A condition's value is a DICOM match (exact, or C-FIND wildcards when it has ``*`` or
  ``?``), a list (any of), or one of ``{equals: V}``, ``{like: V}``, ``{regex: V}``,
  ``{in_network: CIDR or [CIDR, ...]}``, ``{any_of: [...]}``, ``{not: <value>}``.

* Google's (``--destination_config_path`` / ``--destination_config_inline`` /
  ``ENV_DESTINATION_CONFIG_JSON``): a JSON list of ``{"filter": "...",
  "dicomweb_destination": URL}`` and ``{"filter": "...", "name": AET, "host": H,
  "port": P}`` entries, read with the semantics of its ``DestinationFilter``.

  ``redact:`` and ``transcode:`` (docs/deidentification.md) make a destination get a
  de-identified and/or compressed copy; Google's ``--redact_*`` and
  ``--store_compress_to_transfer_syntax`` flags do the same for the destinations the flags
  make (``--dicomweb-url``'s, and Google's destination config entries).

Every error is one line naming the file, the entry and the field.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydicom.datadict import tag_for_keyword
from pydicom.tag import BaseTag, Tag

from stowaway import lenient_json
from stowaway.forwarder.auth import AuthKind, default_auth_kind
from stowaway.forwarder.destinations import (
    NAME_PATTERN,
    ConflictPolicy,
    Delivery,
    Destination,
    DestinationKind,
    DicomwebDestination,
    DimseDestination,
    DimseTls,
    Outbound,
)
from stowaway.receiver.routing import (
    AnyOf,
    Condition,
    Equals,
    InNetwork,
    Matcher,
    Matching,
    Not,
    Regex,
    RoutingTable,
    Rule,
    Subject,
    Wildcard,
    dicom_value_matcher,
    parse_subject,
)
from stowaway.settings import GOOGLE_DESTINATION_CONFIG_ENV, Settings, parse_duration, parse_size

#: The name ``--dicomweb-url`` (Google: ``--dicomweb_address``) is known by.
DEFAULT_NAME = "default"


class DestinationConfigError(ValueError):
    """The destinations file is wrong; the message is one line naming where."""


@dataclass(frozen=True)
class DestinationConfig:
    destinations: tuple[Destination, ...]
    routing: RoutingTable

    def by_name(self, name: str) -> Destination:
        return next(d for d in self.destinations if d.name == name)


@dataclass(frozen=True)
class FlagDefaults:
    """What the forwarder flags say, for every field a destination leaves out."""

    delivery: Delivery = field(default_factory=Delivery)
    auth: AuthKind | None = None  #: None: google for the Healthcare API, else none
    bearer_token_file: Path | None = None
    basic_user: str | None = None
    basic_password_file: Path | None = None
    ca_bundle: Path | None = None
    batch_max_instances: int = 50
    batch_max_bytes: int = 64 * 1024 * 1024
    on_conflict: ConflictPolicy = ConflictPolicy.FAIL
    read_timeout: float = 120.0
    calling_aet: str = "IMPORTADAPTER"
    #: Google's redaction and compression flags, for the destinations the flags make
    outbound: Outbound = field(default_factory=Outbound)

    def dicomweb(self, name: str, url: str) -> DicomwebDestination:
        """A destination at ``url`` with these settings (``--dicomweb-url``'s, or a
        Google entry's, which can set nothing else)."""
        return DicomwebDestination(
            name=name,
            url=url,
            auth=self.auth or default_auth_kind(url),
            delivery=self.delivery,
            bearer_token_file=self.bearer_token_file,
            basic_user=self.basic_user,
            basic_password_file=self.basic_password_file,
            ca_bundle=self.ca_bundle,
            batch_max_instances=self.batch_max_instances,
            batch_max_bytes=self.batch_max_bytes,
            on_conflict=self.on_conflict,
            read_timeout=self.read_timeout,
            outbound=self.outbound,
        )

    def dimse(self, name: str, host: str, port: int, called_aet: str) -> DimseDestination:
        return DimseDestination(
            name=name,
            host=host,
            port=port,
            called_aet=called_aet,
            calling_aet=self.calling_aet,
            delivery=replace(self.delivery, workers=min(self.delivery.workers, 2)),
            outbound=self.outbound,
        )


def single_destination(url: str, defaults: FlagDefaults) -> DestinationConfig:
    """``--dicomweb-url URL`` alone: one destination, no rules."""
    return DestinationConfig(
        (defaults.dicomweb(DEFAULT_NAME, url),), RoutingTable.single(DEFAULT_NAME)
    )


# --- stowaway's own format -------------------------------------------------------------


def load_destinations_file(
    path: Path, defaults: FlagDefaults, dicomweb_url: str | None = None
) -> DestinationConfig:
    """Read and check ``--destinations FILE``. With ``dicomweb_url`` (``--dicomweb-url``
    given as well) that URL is one more destination named ``default`` and the default
    route, unless the file names a default itself."""
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DestinationConfigError(f"{where}: cannot read: {exc.strerror or exc}") from None
    try:
        document = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DestinationConfigError(f"{where}: not valid YAML or JSON: {detail}") from None
    return parse_destinations(document, defaults, dicomweb_url=dicomweb_url, where=where)


_TOP_KEYS = {"destinations", "rules", "matching", "default"}
_DICOMWEB_KEYS = {
    "name", "kind", "url", "auth", "bearer_token_file", "basic_user", "basic_password_file",
    "ca_bundle", "workers", "batch_max_instances", "batch_max_bytes", "on_conflict",
    "connect_timeout", "read_timeout", "max_attempts", "backoff_initial", "backoff_max",
    "redact", "transcode",
}  # fmt: skip
_DIMSE_KEYS = {
    "name", "kind", "host", "port", "called_aet", "calling_aet", "tls", "max_associations",
    "instances_per_association", "connect_timeout", "max_attempts", "backoff_initial",
    "backoff_max", "redact", "transcode",
}  # fmt: skip
_RULE_KEYS = {"name", "when", "to"}


def parse_destinations(
    document: Any, defaults: FlagDefaults, *, dicomweb_url: str | None = None, where: str = ""
) -> DestinationConfig:
    """Check a parsed destinations document (see the module docstring)."""
    top = _Fields(document, where or "destinations file", _TOP_KEYS)
    destinations: list[Destination] = []
    for index, entry in enumerate(top.list("destinations", required=True)):
        destinations.append(_destination(entry, f"{top.where}: destinations[{index}]", defaults))
    if dicomweb_url is not None:
        destinations.append(defaults.dicomweb(DEFAULT_NAME, dicomweb_url))
    names = _unique_names(destinations, top.where)
    matching = top.choice("matching", [m.value for m in Matching], Matching.FIRST.value)
    default = top.optional_str("default")
    if default is None and dicomweb_url is not None:
        default = DEFAULT_NAME
    rules = tuple(
        _rule(entry, f"{top.where}: rules[{index}]", names)
        for index, entry in enumerate(top.list("rules"))
    )
    if default is not None and default not in names:
        raise DestinationConfigError(
            f"{top.where}: default: no destination named {default!r} (known: {_known(names)})"
        )
    table = RoutingTable(rules, Matching(matching), default, frozenset(names))
    return DestinationConfig(tuple(destinations), table)


def _known(names: Sequence[str]) -> str:
    return ", ".join(sorted(names)) or "none"


def _unique_names(destinations: Sequence[Destination], where: str) -> list[str]:
    seen: list[str] = []
    for destination in destinations:
        if destination.name in seen:
            raise DestinationConfigError(
                f"{where}: destination name {destination.name!r} is used twice"
            )
        seen.append(destination.name)
    return seen


def _destination(entry: Any, where: str, defaults: FlagDefaults) -> Destination:
    probe = _Fields(entry, where, _DICOMWEB_KEYS | _DIMSE_KEYS)
    name = probe.name()
    where = f"{where} ({name!r})"
    kind = _Fields(entry, where, _DICOMWEB_KEYS | _DIMSE_KEYS).choice(
        "kind", [k.value for k in DestinationKind], ""
    )
    if kind == DestinationKind.DICOMWEB:
        return _dicomweb(_Fields(entry, where, _DICOMWEB_KEYS), name, defaults)
    return _dimse(_Fields(entry, where, _DIMSE_KEYS), name, defaults)


def _delivery(fields: _Fields, base: Delivery, workers_key: str) -> Delivery:
    return Delivery(
        workers=fields.integer(workers_key, base.workers, minimum=1),
        max_attempts=fields.integer("max_attempts", base.max_attempts, minimum=1),
        backoff_initial=fields.seconds("backoff_initial", base.backoff_initial),
        backoff_max=fields.seconds("backoff_max", base.backoff_max),
        connect_timeout=fields.seconds("connect_timeout", base.connect_timeout),
    )


def _dicomweb(fields: _Fields, name: str, defaults: FlagDefaults) -> DicomwebDestination:
    url = fields.required_str("url")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DestinationConfigError(f"{fields.where}: url: {url!r} is not an http(s) URL")
    auth = fields.optional_choice("auth", [a.value for a in AuthKind])
    base = defaults.dicomweb(name, url)
    return replace(
        base,
        auth=AuthKind(auth) if auth else base.auth,
        delivery=_delivery(fields, defaults.delivery, "workers"),
        bearer_token_file=fields.path("bearer_token_file", base.bearer_token_file),
        basic_user=fields.optional_str("basic_user") or base.basic_user,
        basic_password_file=fields.path("basic_password_file", base.basic_password_file),
        ca_bundle=fields.path("ca_bundle", base.ca_bundle),
        batch_max_instances=fields.integer("batch_max_instances", base.batch_max_instances, 1),
        batch_max_bytes=fields.size("batch_max_bytes", base.batch_max_bytes),
        on_conflict=ConflictPolicy(
            fields.choice("on_conflict", [c.value for c in ConflictPolicy], base.on_conflict)
        ),
        read_timeout=fields.seconds("read_timeout", base.read_timeout),
        outbound=_outbound(fields),
    )


def _outbound(fields: _Fields) -> Outbound:
    """An entry's ``redact:`` and ``transcode:`` (never the flags': an entry says its own).

    ``redact`` takes one of ``remove: [tags]``, ``keep: [tags]`` or ``profile: CHC_BASIC |
    DICOM_BASIC`` (``retain_dates: true`` with DICOM_BASIC), ``uid_scheme: keyed | google``
    (default keyed) and ``uid_key_file`` (required for keyed); ``transcode`` a transfer
    syntax UID, or ``{syntax: UID, j2k_psnr: dB}`` (or ``j2k_cr``, ``jls_error``) for a
    lossy one.
    """
    from stowaway.forwarder.deidentify import RedactionConfigError, RedactionSpec
    from stowaway.forwarder.transcode import TranscodeConfigError, TranscodeTarget

    redaction = transcode = None
    try:
        if "redact" in fields.mapping:
            settings = fields.mapping["redact"]
            if not isinstance(settings, Mapping):
                raise fields._fail("redact", "a mapping (remove, keep or profile, uid_key_file)")
            redaction = RedactionSpec.from_config(settings, f"{fields.where}: redact")
        if "transcode" in fields.mapping:
            transcode = TranscodeTarget.from_config(
                fields.mapping["transcode"], f"{fields.where}: transcode"
            )
    except (RedactionConfigError, TranscodeConfigError) as exc:
        raise DestinationConfigError(str(exc)) from None
    return Outbound(redaction, transcode, fields.where)


def _dimse(fields: _Fields, name: str, defaults: FlagDefaults) -> DimseDestination:
    host = fields.required_str("host")
    port = fields.integer("port", None, minimum=1)
    if port is None or port > 65535:
        raise DestinationConfigError(f"{fields.where}: port: a TCP port (1-65535) is required")
    base = defaults.dimse(name, host, port, fields.aet("called_aet", required=True))
    tls = None
    if "tls" in fields.mapping:
        tls_fields = _Fields(fields.mapping["tls"], f"{fields.where}: tls", {"ca", "cert", "key"})
        tls = DimseTls(
            ca=tls_fields.path("ca", None),
            cert=tls_fields.path("cert", None),
            key=tls_fields.path("key", None),
        )
        if (tls.cert is None) != (tls.key is None):
            raise DestinationConfigError(f"{fields.where}: tls: cert and key go together")
    return replace(
        base,
        calling_aet=fields.aet("calling_aet") or base.calling_aet,
        delivery=_delivery(fields, base.delivery, "max_associations"),
        tls=tls,
        instances_per_association=fields.integer(
            "instances_per_association", base.instances_per_association, 1
        ),
        outbound=_outbound(fields),
    )


def _rule(entry: Any, where: str, names: Sequence[str]) -> Rule:
    fields = _Fields(entry, where, _RULE_KEYS)
    name = fields.optional_str("name") or where.rsplit(": ", 1)[-1]
    where = f"{where} ({name!r})" if fields.optional_str("name") else where
    fields = _Fields(entry, where, _RULE_KEYS)
    when = fields.mapping.get("when", {})
    if not isinstance(when, Mapping):
        raise DestinationConfigError(f"{where}: when: a mapping of conditions is required")
    conditions = tuple(
        _condition(str(key), value, f"{where}: when.{key}") for key, value in when.items()
    )
    raw_to = fields.mapping.get("to")
    targets = [raw_to] if isinstance(raw_to, str) else raw_to
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise DestinationConfigError(f"{where}: to: one destination name or a list is required")
    for target in targets:
        if target not in names:
            raise DestinationConfigError(
                f"{where}: to: no destination named {target!r} (known: {_known(names)})"
            )
    return Rule(name, conditions, tuple(dict.fromkeys(targets)))


def _condition(key: str, value: Any, where: str) -> Condition:
    try:
        subject = parse_subject(key)
    except ValueError as exc:
        raise DestinationConfigError(f"{where}: {exc}") from None
    return Condition(subject, _matcher(value, where, subject))


_MATCHER_KEYS = ("equals", "like", "regex", "in_network", "any_of", "not")


def _matcher(value: Any, where: str, subject: object) -> Matcher:
    if isinstance(value, bool) or value is None:
        raise DestinationConfigError(f"{where}: a value to match is required, not {value!r}")
    if isinstance(value, str | int | float):
        return dicom_value_matcher(str(value))
    if isinstance(value, list):
        if not value:
            raise DestinationConfigError(f"{where}: an empty list matches nothing")
        return AnyOf(tuple(_matcher(v, where, subject) for v in value))
    if not isinstance(value, Mapping) or len(value) != 1:
        raise DestinationConfigError(
            f"{where}: expected a value, a list, or one of {{{', '.join(_MATCHER_KEYS)}}}"
        )
    ((kind, argument),) = value.items()
    if kind == "equals":
        return Equals(str(argument))
    if kind == "like":
        return Wildcard(str(argument))
    if kind == "regex":
        try:
            re.compile(str(argument))
        except re.error as exc:
            raise DestinationConfigError(f"{where}: regex: {exc}") from None
        return Regex(str(argument))
    if kind == "in_network":
        items = argument if isinstance(argument, list) else [argument]
        try:
            networks = tuple(ipaddress.ip_network(str(n), strict=False) for n in items)
        except ValueError as exc:
            raise DestinationConfigError(f"{where}: in_network: {exc}") from None
        return InNetwork(networks)
    if kind == "any_of":
        return _matcher(list(argument) if isinstance(argument, list) else argument, where, subject)
    if kind == "not":
        return Not(_matcher(argument, where, subject))
    raise DestinationConfigError(
        f"{where}: unknown matcher {kind!r} (use one of {', '.join(_MATCHER_KEYS)})"
    )


class _Fields:
    """One mapping of the document, read field by field with errors that say where."""

    def __init__(self, value: Any, where: str, allowed: set[str]) -> None:
        if not isinstance(value, Mapping):
            raise DestinationConfigError(f"{where}: expected a mapping, got {_kind(value)}")
        unknown = sorted(str(k) for k in value if k not in allowed)
        if unknown:
            raise DestinationConfigError(
                f"{where}: unknown field {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})"
            )
        self.mapping: Mapping[str, Any] = value
        self.where = where

    def _fail(self, key: str, wanted: str) -> DestinationConfigError:
        return DestinationConfigError(
            f"{self.where}: {key}: expected {wanted}, got {self.mapping.get(key)!r}"
        )

    def name(self) -> str:
        name = self.mapping.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise self._fail("name", "a name of letters, digits, '.', '_' or '-' (max 63)")
        return name

    def list(self, key: str, required: bool = False) -> list[Any]:
        value = self.mapping.get(key)
        if value is None and not required:
            return []
        if not isinstance(value, list) or (required and not value):
            raise self._fail(key, "a non-empty list" if required else "a list")
        return value

    def optional_str(self, key: str) -> str | None:
        value = self.mapping.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise self._fail(key, "a string")
        return value

    def required_str(self, key: str) -> str:
        value = self.optional_str(key)
        if value is None:
            raise DestinationConfigError(f"{self.where}: {key}: required")
        return value

    def aet(self, key: str, required: bool = False) -> str:
        value = self.required_str(key) if required else self.optional_str(key)
        if value is None:
            return ""
        if len(value) > 16 or not value.strip() or "\\" in value:
            raise self._fail(key, "an AE title of 1-16 characters without '\\'")
        return value.strip()

    def choice(self, key: str, allowed: Sequence[str], default: str) -> str:
        value = self.mapping.get(key, default)
        if value not in allowed:
            raise self._fail(key, "one of " + ", ".join(allowed))
        return str(value)

    def optional_choice(self, key: str, allowed: Sequence[str]) -> str | None:
        return None if key not in self.mapping else self.choice(key, allowed, "")

    def integer(self, key: str, default: int | None, minimum: int = 0) -> Any:
        value = self.mapping.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self._fail(key, f"a whole number >= {minimum}")
        return value

    def seconds(self, key: str, default: float) -> float:
        value = self.mapping.get(key, default)
        try:
            seconds = (
                float(value)
                if isinstance(value, int | float) and not isinstance(value, bool)
                else parse_duration(str(value))
            )
        except ValueError:
            raise self._fail(key, "a duration such as 30s, 5m or 2h") from None
        if seconds < 0:
            raise self._fail(key, "a duration >= 0")
        return seconds

    def size(self, key: str, default: int) -> int:
        value = self.mapping.get(key, default)
        try:
            return value if isinstance(value, int) and value > 0 else parse_size(str(value))
        except ValueError:
            raise self._fail(key, "a size such as 64MiB") from None

    def path(self, key: str, default: Path | None) -> Path | None:
        value = self.optional_str(key)
        return Path(value) if value is not None else default


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


# --- Google's format ----------------------------------------------------------------------

#: Google's ``DestinationFilter``: the key for the calling AE title.
GOOGLE_AET_KEY = "AETitle"


def parse_google_filter(text: str, where: str) -> tuple[Condition, ...]:
    """Google's filter string, read as its ``DestinationFilter`` and dcm4che's
    ``Attributes.matches`` read it: ``KEY=VALUE`` pairs joined by ``&``, all of which must
    hold. ``AETitle`` is the calling AE title (exact, case-sensitive). Any other key is a
    tag in hex (as dcm4che's ``TagUtils.forName`` tries first) or a keyword; its value is
    matched exactly and case-sensitively but for ``*``/``?`` wildcards, with ``\\``
    between alternatives. An absent or empty attribute never matches; a multi-valued one
    matches when any value does."""
    conditions: list[Condition] = []
    for pair in text.split("&"):
        parts = pair.split("=")
        # Java's split drops trailing empty strings: "Modality=" is one part, rejected.
        while len(parts) > 1 and parts[-1] == "":
            parts.pop()
        if len(parts) != 2:
            raise DestinationConfigError(f"{where}: filter: invalid parameter {pair!r}")
        key, value = parts
        if key == GOOGLE_AET_KEY:
            conditions.append(Condition(Subject.CALLING_AET, Equals(value)))
            continue
        subject = _google_tag(key)
        if subject is None:
            raise DestinationConfigError(f"{where}: filter: invalid tag {key!r}")
        alternatives = tuple(dicom_value_matcher(v) for v in value.split("\\"))
        matcher = alternatives[0] if len(alternatives) == 1 else AnyOf(alternatives)
        conditions.append(Condition(subject, matcher))
    return tuple(conditions)


def _google_tag(key: str) -> BaseTag | None:
    if not key:
        return None
    if re.fullmatch(r"[0-9A-Fa-f]{1,8}", key):
        return Tag(int(key, 16))
    tag = tag_for_keyword(key) if key.isidentifier() else None
    return None if tag is None else Tag(tag)


def _google_name(url: str, taken: set[str]) -> str:
    """A readable name for a Google DICOMweb entry: its DICOM store's name when the URL is
    the Healthcare API's, else its host; made unique with a number."""
    found = re.search(r"/dicomStores/([^/]+)/dicomWeb", url)
    base = found.group(1) if found else (urlsplit(url).hostname or "dicomweb")
    base = re.sub(r"[^A-Za-z0-9_.-]", "-", base)[:56] or "dicomweb"
    name, number = base, 2
    while name in taken:
        name, number = f"{base}-{number}", number + 1
    return name


def _without_studies(url: str) -> str:
    """Google appends ``/studies`` to a URL that lacks it; we append it ourselves, so a URL
    given with it is stored without."""
    return url[: -len("/studies")] if url.rstrip("/").endswith("/studies") else url.rstrip("/")


def _lenient_json(text: str, where: str) -> Any:
    """JSON as Google's adapter reads it (org.json): single quotes, trailing commas and
    the rest of what :mod:`stowaway.lenient_json` accepts."""
    try:
        return lenient_json.loads(text)
    except lenient_json.LenientJSONError as exc:
        raise DestinationConfigError(f"{where}: not valid JSON: {exc}") from None


def parse_google_config(
    text: str,
    defaults: FlagDefaults,
    *,
    dicomweb_url: str | None,
    send_to_all: bool,
    where: str = "destination config",
) -> DestinationConfig:
    """Google's destination config (a JSON list), routed as Google's adapter routes it.

    Without ``send_to_all`` the first matching entry wins, a filter may appear only once,
    and what matches nothing goes to ``--dicomweb_address`` (named ``default``). With
    ``send_to_all`` every matching entry gets the instance and the same filter may name
    several destinations; Google then sends an instance that matches nothing nowhere and
    still answers Success: we keep it as unrouted instead, visible in ``queue ls``.
    Unlike Google's, DIMSE entries work in both modes (Google's first-match mode accepts
    DICOMweb entries only)."""
    entries = _lenient_json(text, where)
    if not isinstance(entries, list):
        raise DestinationConfigError(f"{where}: expected a JSON list of destinations")
    destinations: list[Destination] = []
    rules: list[Rule] = []
    filters: set[str] = set()
    taken: set[str] = {DEFAULT_NAME}
    for index, entry in enumerate(entries):
        at = f"{where}: [{index}]"
        if not isinstance(entry, Mapping):
            raise DestinationConfigError(f"{at}: expected an object")
        text_filter = entry.get("filter")
        if not isinstance(text_filter, str) or not text_filter:
            raise DestinationConfigError(f"{at}: filter: required")
        if text_filter in filters and not send_to_all:
            raise DestinationConfigError(
                f"{at}: filter: {text_filter!r} appears twice (allowed only with "
                "--send_to_all_matching_destinations)"
            )
        filters.add(text_filter)
        conditions = parse_google_filter(text_filter, at)
        destination: Destination
        if "host" in entry:
            fields = _Fields(entry, at, {"filter", "name", "host", "port"})
            aet = fields.aet("name", required=True)
            port = fields.integer("port", None, minimum=1)
            if port is None or port > 65535:
                raise DestinationConfigError(f"{at}: port: a TCP port (1-65535) is required")
            name = _google_name(aet, taken) if NAME_PATTERN.match(aet) is None else aet
            name = name if name not in taken else _google_name(name, taken)
            destination = defaults.dimse(name, fields.required_str("host"), port, aet)
        else:
            fields = _Fields(entry, at, {"filter", "dicomweb_destination"})
            url = _without_studies(fields.required_str("dicomweb_destination"))
            if urlsplit(url).scheme not in ("http", "https"):
                raise DestinationConfigError(f"{at}: dicomweb_destination: not an http(s) URL")
            destination = defaults.dicomweb(_google_name(url, taken), url)
        taken.add(destination.name)
        destinations.append(destination)
        rules.append(Rule(f"[{index}] {text_filter}", conditions, (destination.name,)))
    default = None
    if dicomweb_url is not None:
        destinations.append(defaults.dicomweb(DEFAULT_NAME, _without_studies(dicomweb_url)))
        default = None if send_to_all else DEFAULT_NAME
    matching = Matching.ALL if send_to_all else Matching.FIRST
    names = frozenset(d.name for d in destinations)
    return DestinationConfig(
        tuple(destinations), RoutingTable(tuple(rules), matching, default, names)
    )


# --- from the settings --------------------------------------------------------------------


def settings_for(settings: Settings, destination: DicomwebDestination) -> Settings:
    """The settings with this destination's URL, auth and TLS in the flags' places, for
    code that reads a store the way the flags describe one (``check``, query/retrieve)."""
    return replace(
        settings,
        dicomweb_url=destination.url,
        auth=destination.auth.value,
        bearer_token_file=destination.bearer_token_file,
        basic_user=destination.basic_user,
        basic_password_file=destination.basic_password_file,
        ca_bundle=destination.ca_bundle,
        connect_timeout=destination.delivery.connect_timeout,
    )


#: Where a destination's transforms came from when Google's flags set them.
GOOGLE_FLAGS = "Google's flags"


def google_outbound(settings: Settings) -> Outbound:
    """``--redact_remove_list`` | ``--redact_keep_list`` | ``--redact_filter_profile`` and
    ``--store_compress_to_transfer_syntax``, read as Google's adapter reads them.

    Without ``--redact-uid-key-file`` the UIDs are Google's (``uid_scheme: google``), so that
    a store Google's adapter filled keeps deduplicating; with it, keyed.
    """
    given = (
        settings.redact_remove_list
        or settings.redact_keep_list
        or settings.redact_filter_profile
        or settings.store_compress_to_transfer_syntax
    )
    if not given and settings.redact_uid_key_file is None:
        return Outbound()
    from stowaway.forwarder.deidentify import RedactionConfigError, RedactionSpec, UidScheme
    from stowaway.forwarder.transcode import TranscodeConfigError, TranscodeTarget

    key = settings.redact_uid_key_file
    try:
        redaction = RedactionSpec.from_google_flags(
            settings.redact_remove_list,
            settings.redact_keep_list,
            settings.redact_filter_profile,
            uid_scheme=UidScheme.KEYED if key is not None else UidScheme.GOOGLE,
            uid_key_file=key,
        )
        syntax = settings.store_compress_to_transfer_syntax
        transcode = (
            TranscodeTarget.from_config(syntax, "--store_compress_to_transfer_syntax")
            if syntax
            else None
        )
    except (RedactionConfigError, TranscodeConfigError) as exc:
        raise DestinationConfigError(str(exc)) from None
    if redaction is None and key is not None:
        raise DestinationConfigError(
            "--redact-uid-key-file: has no effect without --redact_remove_list, "
            "--redact_keep_list or --redact_filter_profile"
        )
    return Outbound(redaction, transcode, GOOGLE_FLAGS)


def check_outbound(settings: Settings) -> list[Destination]:
    """Every destination that redacts can read its UID key (one line when one cannot);
    returns the destinations whose copies are changed on the way out."""
    from stowaway.forwarder.deidentify import Redactor, UidKeyError

    config = destination_config(settings)
    changed = (
        [] if config is None else [d for d in config.destinations if d.outbound.changes_instances]
    )
    for destination in changed:
        spec = destination.outbound.redaction
        if spec is None:
            continue
        try:
            Redactor(spec)
        except UidKeyError as exc:
            source = destination.outbound.source
            where = (
                "--redact-uid-key-file"
                if source == GOOGLE_FLAGS
                else f"{source}: redact.uid_key_file"
            )
            raise DestinationConfigError(f"{where}: {exc}") from None
    return changed


def flag_defaults(settings: Settings) -> FlagDefaults:
    """The forwarder flags as every destination's defaults."""
    return FlagDefaults(
        delivery=Delivery(
            workers=settings.workers,
            max_attempts=settings.max_attempts,
            backoff_initial=settings.backoff_initial,
            backoff_max=settings.backoff_max,
            connect_timeout=settings.connect_timeout,
        ),
        auth=AuthKind(settings.auth) if settings.auth else None,
        bearer_token_file=settings.bearer_token_file,
        basic_user=settings.basic_user,
        basic_password_file=settings.basic_password_file,
        ca_bundle=settings.ca_bundle,
        batch_max_instances=settings.batch_max_instances,
        batch_max_bytes=settings.batch_max_bytes,
        on_conflict=ConflictPolicy(settings.on_conflict),
        read_timeout=settings.read_timeout,
        calling_aet=settings.aet,
        outbound=google_outbound(settings),
    )


def destination_config(settings: Settings) -> DestinationConfig | None:
    """Where instances go, from whichever way the settings give it: ``--destinations``,
    Google's destination config (inline, then path, then ``ENV_DESTINATION_CONFIG_JSON``:
    Google's precedence), or ``--dicomweb-url`` alone. None: receive only."""
    defaults = flag_defaults(settings)
    google_given = (
        settings.destination_config_inline is not None
        or settings.destination_config_path is not None
        or settings.destination_config_env is not None
    )
    if settings.destinations is not None and google_given:
        raise DestinationConfigError(
            "--destinations: give either it or Google's --destination_config_*, not both"
        )
    if settings.destinations is not None:
        return load_destinations_file(settings.destinations, defaults, settings.dicomweb_url)
    if settings.destination_config_inline is not None:
        text, where = settings.destination_config_inline, "--destination_config_inline"
    elif settings.destination_config_path is not None:
        where = str(settings.destination_config_path)
        try:
            text = settings.destination_config_path.read_text(encoding="utf-8")
        except OSError as exc:
            raise DestinationConfigError(f"{where}: cannot read: {exc.strerror or exc}") from None
    elif settings.destination_config_env is not None:
        text, where = settings.destination_config_env, GOOGLE_DESTINATION_CONFIG_ENV
    elif settings.dicomweb_url is not None:
        return single_destination(settings.dicomweb_url, defaults)
    else:
        return None
    return parse_google_config(
        text,
        defaults,
        dicomweb_url=settings.dicomweb_url,
        send_to_all=settings.send_to_all_matching_destinations,
        where=where,
    )
