"""The one typed settings object, read from flags and ``STOWAWAY_*`` variables.

Every option has a flag and an environment variable named ``STOWAWAY_`` plus
the flag's name in upper case with dashes as underscores (``--db-url`` ->
``STOWAWAY_DB_URL``). A flag wins over the variable, the variable over the
default. Google's adapter flags (``--dimse_aet``, ``--dimse_port``,
``--dicomweb_address``) are accepted as aliases so its manifests run unchanged.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from stowaway.batch_limits import BATCH_MAX_BYTES, BATCH_MAX_INSTANCES

if TYPE_CHECKING:
    from stowaway.db.engine import PostgresTimeouts
    from stowaway.receiver.aet_dictionary import MoveDestination


class SettingsError(ValueError):
    """An invalid option; the message names the flag and what is expected."""


#: How many uploads at once a forwarder may grow to, unless --max-workers says.
DEFAULT_MAX_WORKERS = 16

# Option groups: each subcommand accepts the groups it needs.
COMMON, RECEIVER, FORWARDER, HTTP = "common", "receiver", "forwarder", "http"
#: Google's adapter reads its destination config from this variable last (not STOWAWAY_*).
GOOGLE_DESTINATION_CONFIG_ENV = "ENV_DESTINATION_CONFIG_JSON"
#: Where instances go: read by the receiver (the rules) and the forwarder (the destinations).
ROUTING = "routing"
#: Storage commitment (docs/storage-commitment.md): read where the receiver runs.
COMMITMENT = "commitment"
#: Google's redaction and compression flags: what the flags' destinations are sent.
DEIDENTIFY = "deidentify"
#: How long done rows stay in the queue (``serve`` and ``forward`` delete them).
RETENTION = "retention"


def _aet(value: str) -> str:
    if not 1 <= len(value.strip()) <= 16 or "\\" in value or not value.isprintable():
        raise ValueError("an AE title is 1 to 16 printable characters, no backslash")
    return value.strip()


def _port(value: str) -> int:
    port: int = int(value)
    if not 0 <= port <= 65535:
        raise ValueError("a port is 0 to 65535")
    return port


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be a whole number of at least 1")
    return number


def _optional_positive_int(value: str) -> int | None:
    return None if value.lower() in ("", "0", "none", "unlimited") else _positive_int(value)


def _seconds(value: str) -> float:
    """``30``, ``2.5``, ``500ms``, ``10s``, ``10m``, ``2h`` or ``7d``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", value)
    if not match:
        raise ValueError("a duration such as 30, 10s, 5m, 2h or 7d")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}[match.group(2)]
    return float(match.group(1)) * scale


def _bytes(value: str) -> int:
    """``1048576``, ``512KB``, ``64MiB``, ``1GB``..."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]i?B?)?\s*", value, re.IGNORECASE)
    if not match:
        raise ValueError("a size such as 1048576, 512KiB, 64MiB or 1GiB")
    unit = (match.group(2) or "").upper().rstrip("B").rstrip("I")
    multiplier: int = 1024 ** " KMGT".index(unit or " ")
    return int(match.group(1)) * multiplier


#: The flags' syntax for durations and sizes, for files that configure the same things.
parse_duration = _seconds
parse_size = _bytes


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value.lower() not in choices:
            raise ValueError(f"one of {', '.join(choices)}")
        return value.lower()

    return parse


def _aet_list(value: str) -> tuple[str, ...]:
    return tuple(_aet(v) for v in value.split(",") if v.strip())


def _url(value: str) -> str:
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError("an http:// or https:// URL")
    if parsed.username or parsed.password:
        # It would be logged at start-up; secrets only come from files.
        raise ValueError(
            "no user or password in the URL: use --auth basic with --basic-password-file"
        )
    return value.rstrip("/")


#: ``--query-url off``: no query/retrieve even with --dicomweb-url.
QUERY_OFF = "off"


def _query_url(value: str) -> str:
    return QUERY_OFF if value.strip().lower() in (QUERY_OFF, "none") else _url(value)


def _redact(value: str) -> str:
    """``value`` with the password of any ``scheme://user:password@`` in it masked."""
    return re.sub(r"(//[^/@:\s]*):[^/@\s]*@", r"\1:***@", value)


def _path(value: str) -> Path:
    return Path(value).expanduser()


def _text(value: str) -> str:
    return value


def _bool(value: str) -> bool:
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("", "0", "false", "no", "off"):
        return False
    raise ValueError("true or false")


def _processes(value: str) -> int | None:
    """``auto`` (None: as many as the CPUs available) or a whole number of at least 1."""
    return None if value.strip().lower() == "auto" else _positive_int(value)


def _peer_list(value: str) -> tuple[str, ...]:
    from stowaway.receiver.peers import parse_rules

    return tuple(str(rule) for rule in parse_rules(value))


@dataclass(frozen=True)
class Option:
    name: str
    flags: tuple[str, ...]
    parse: Callable[[str], Any]
    default: Any
    help: str
    group: str
    metavar: str | None = None
    #: A switch without a value (``--tls-only``); its variable takes true/false.
    switch: bool = False

    @property
    def env(self) -> str:
        return "STOWAWAY_" + self.name.upper()

    @property
    def flag(self) -> str:
        return self.flags[0]


OPTIONS: tuple[Option, ...] = (
    # common
    Option(
        "data_dir",
        ("--data-dir",),
        _path,
        Path("stowaway-data"),
        "directory for the queue database and the spool",
        COMMON,
    ),
    Option(
        "db_url",
        ("--db-url",),
        _text,
        None,
        "queue database URL (default sqlite:///<data-dir>/queue.db; "
        "Postgres: postgresql+psycopg://user@host/db)",
        COMMON,
    ),
    Option(
        "db_connect_timeout",
        ("--db-connect-timeout",),
        _seconds,
        10.0,
        "Postgres: how long opening a queue database connection may take",
        COMMON,
    ),
    Option(
        "db_statement_timeout",
        ("--db-statement-timeout",),
        _seconds,
        30.0,
        "Postgres: statement_timeout of queue database statements; the client also "
        "gives a connection up when no answer comes 2 s after it (0: no limit)",
        COMMON,
    ),
    Option(
        "db_keepalives_idle",
        ("--db-keepalives-idle",),
        _seconds,
        30.0,
        "Postgres: idle time before TCP keepalives probe a queue database connection",
        COMMON,
    ),
    Option(
        "db_keepalives_interval",
        ("--db-keepalives-interval",),
        _seconds,
        10.0,
        "Postgres: time between TCP keepalive probes (times the count: how long "
        "unacknowledged data may wait, tcp_user_timeout)",
        COMMON,
    ),
    Option(
        "db_keepalives_count",
        ("--db-keepalives-count",),
        _positive_int,
        3,
        "Postgres: unanswered keepalive probes before the connection counts as dead",
        COMMON,
    ),
    Option(
        "spool_dir",
        ("--spool-dir",),
        _path,
        None,
        "where received instances wait (default <data-dir>/spool)",
        COMMON,
    ),
    Option(
        "node_id",
        ("--node-id",),
        _text,
        "",
        "this volume's name when several pods share one Postgres queue: each "
        "forwards only the instances it received",
        COMMON,
    ),
    Option(
        "log_level",
        ("--log-level",),
        _choice("debug", "info", "warning", "error"),
        "info",
        "debug, info, warning or error",
        COMMON,
    ),
    Option(
        "log_format",
        ("--log-format",),
        _choice("text", "json"),
        "text",
        "text (key=value) or json (one object per line, for Cloud Logging)",
        COMMON,
    ),
    # receiver
    Option(
        "aet",
        ("--aet", "--dimse_aet"),
        _aet_list,
        "IMPORTADAPTER",
        "called AE title this receiver answers to; A,B: several (the first is also the "
        "calling AE title towards DICOM destinations)",
        RECEIVER,
    ),
    Option("port", ("--port", "--dimse_port"), _port, 2575, "DICOM port", RECEIVER),
    Option("host", ("--host",), _text, "0.0.0.0", "address to listen on", RECEIVER),
    Option(
        "allowed_calling_aets",
        ("--allowed-calling-aets",),
        _aet_list,
        (),
        "comma-separated calling AE titles allowed to send (default: any)",
        RECEIVER,
    ),
    Option(
        "max_associations",
        ("--max-associations",),
        _positive_int,
        20,
        "concurrent associations accepted",
        RECEIVER,
    ),
    Option(
        "idle_timeout",
        ("--idle-timeout",),
        _seconds,
        60.0,
        "seconds an association may stay silent before it is aborted",
        RECEIVER,
    ),
    Option(
        "max_pdu",
        ("--max-pdu",),
        _positive_int,
        262144,
        "largest PDU we accept, in bytes (bounded: it sets the receive buffer size)",
        RECEIVER,
    ),
    Option(
        "max_instance_size",
        ("--max-instance-size",),
        _bytes,
        4 * 1024**3,
        "largest dataset one C-STORE may send; a larger one is aborted as it arrives",
        RECEIVER,
    ),
    Option(
        "tls_port",
        ("--tls-port",),
        _port,
        0,
        "port for DICOM over TLS, in addition to --port (0: no TLS listener)",
        RECEIVER,
    ),
    Option(
        "tls_cert",
        ("--tls-cert",),
        _path,
        None,
        "PEM certificate (then its chain) of the TLS listener",
        RECEIVER,
    ),
    Option(
        "tls_key",
        ("--tls-key",),
        _path,
        None,
        "unencrypted PEM private key of --tls-cert",
        RECEIVER,
    ),
    Option(
        "tls_ca",
        ("--tls-ca",),
        _path,
        None,
        "PEM CA bundle: TLS clients must present a certificate issued by it",
        RECEIVER,
    ),
    Option(
        "tls_only",
        ("--tls-only",),
        _bool,
        False,
        "no plain DICOM listener: accept DICOM only on --tls-port",
        RECEIVER,
        switch=True,
    ),
    Option(
        "allowed_peers",
        ("--allowed-peers",),
        _peer_list,
        (),
        "comma-separated AE@CIDR: this calling AE title, only from this network "
        "(*@CIDR: any title); adds to --allowed-calling-aets (default: any)",
        RECEIVER,
    ),
    # query/retrieve (C-FIND, C-MOVE, C-GET answered from the DICOMweb store)
    Option(
        "query_url",
        ("--query-url",),
        _query_url,
        None,
        "DICOMweb base URL that C-FIND, C-MOVE and C-GET are answered from "
        "(default --dicomweb-url; off, or neither: no query/retrieve)",
        RECEIVER,
    ),
    Option(
        "query_destination",
        ("--query-destination",),
        _text,
        None,
        "answer C-FIND, C-MOVE and C-GET from this DICOMweb destination of --destinations "
        "(its URL, auth and CA bundle); default: the default destination",
        ROUTING,
    ),
    Option(
        "fuzzy_matching",
        ("--fuzzy-matching", "--fuzzy_matching"),
        _bool,
        False,
        "add fuzzymatching=true to every QIDO-RS search (person names)",
        RECEIVER,
        switch=True,
    ),
    Option(
        "aet_dictionary",
        ("--aet-dictionary", "--aet_dictionary"),
        _path,
        None,
        "JSON file of C-MOVE destinations, Google's format [{name, host, port}]",
        RECEIVER,
    ),
    Option(
        "aet_dictionary_inline",
        ("--aet-dictionary-inline", "--aet_dictionary_inline"),
        _text,
        None,
        "the same JSON inline; wins over --aet-dictionary, which wins over ENV_AETS_JSON",
        RECEIVER,
    ),
    Option(
        "cmove_aet",
        ("--cmove-aet", "--dimse_cmove_aet"),
        _aet,
        None,
        "calling AE title of C-MOVE sub-operation associations (default --aet)",
        RECEIVER,
    ),
    Option(
        "query_max_per_peer",
        ("--query-max-per-peer",),
        _positive_int,
        2,
        "queries and retrieves one peer address may run at once",
        RECEIVER,
    ),
    Option(
        "query_max_results",
        ("--query-max-results",),
        _positive_int,
        10_000,
        "matches one C-FIND may return, instances one C-MOVE/C-GET may send (at most 65535)",
        RECEIVER,
    ),
    Option(
        "query_page_size",
        ("--query-page-size",),
        _positive_int,
        500,
        "QIDO-RS results per request (limit/offset paging; at most 5000)",
        RECEIVER,
    ),
    Option(
        "query_timeout",
        ("--query-timeout",),
        _seconds,
        60.0,
        "how long one QIDO-RS or WADO-RS request may wait for the store",
        RECEIVER,
    ),
    Option(
        "grace_period",
        ("--grace-period",),
        _seconds,
        30.0,
        "on SIGTERM, how long to let associations and uploads in progress finish",
        COMMON,
    ),
    # forwarder
    Option(
        "dicomweb_url",
        ("--dicomweb-url", "--dicomweb_address"),
        _url,
        None,
        "DICOMweb base URL to forward to (STOW-RS POST {url}/studies)",
        FORWARDER,
    ),
    Option(
        "auth",
        ("--auth",),
        _choice("google", "bearer", "basic", "none"),
        None,
        "google, bearer, basic or none (default: google for healthcare.googleapis.com, else none)",
        FORWARDER,
    ),
    Option(
        "bearer_token_file",
        ("--bearer-token-file",),
        _path,
        None,
        "file holding the bearer token (re-read when it changes)",
        FORWARDER,
    ),
    Option("basic_user", ("--basic-user",), _text, None, "user for --auth basic", FORWARDER),
    Option(
        "basic_password_file",
        ("--basic-password-file",),
        _path,
        None,
        "file holding the password for --auth basic",
        FORWARDER,
    ),
    Option(
        "ca_bundle",
        ("--ca-bundle",),
        _path,
        None,
        "CA bundle to verify the destination's TLS certificate",
        FORWARDER,
    ),
    Option("workers", ("--workers",), _positive_int, 4, "parallel uploads", FORWARDER),
    Option(
        "sender_first",
        ("--sender-first",),
        _seconds,
        10.0,
        "serve: while instances arrive, uploads wait (senders get the CPU) for at most "
        "this long into one transfer, then one upload goes on; 0: never wait",
        FORWARDER,
    ),
    Option(
        "batch_max_instances",
        ("--batch-max-instances",),
        _positive_int,
        BATCH_MAX_INSTANCES,
        "instances of one study per STOW-RS request",
        FORWARDER,
    ),
    Option(
        "batch_max_bytes",
        ("--batch-max-bytes",),
        _bytes,
        BATCH_MAX_BYTES,
        "bytes per STOW-RS request (an instance larger than that goes alone)",
        FORWARDER,
    ),
    Option(
        "backoff_initial",
        ("--backoff-initial",),
        _seconds,
        2.0,
        "first retry delay after a transient failure",
        FORWARDER,
    ),
    Option("backoff_max", ("--backoff-max",), _seconds, 600.0, "longest retry delay", FORWARDER),
    Option(
        "max_attempts",
        ("--max-attempts",),
        _optional_positive_int,
        None,
        "transient failures before an instance is failed (default unlimited)",
        FORWARDER,
    ),
    Option(
        "on_conflict",
        ("--on-conflict",),
        _choice("fail", "overwrite"),
        "fail",
        "409 from the destination: fail the instance, or delete the stored one and upload again",
        FORWARDER,
    ),
    Option(
        "keep_done",
        ("--keep-done",),
        _seconds,
        0.0,
        "keep spool files of forwarded instances this long (default: delete at once)",
        FORWARDER,
    ),
    Option(
        "lease",
        ("--lease",),
        _seconds,
        300.0,
        "how long a claimed instance is held before another forwarder may take it",
        FORWARDER,
    ),
    Option(
        "connect_timeout", ("--connect-timeout",), _seconds, 10.0, "HTTP connect timeout", FORWARDER
    ),
    Option("read_timeout", ("--read-timeout",), _seconds, 120.0, "HTTP read timeout", FORWARDER),
    Option(
        "poll_interval",
        ("--poll-interval",),
        _seconds,
        1.0,
        "how often an idle forwarder looks for due instances",
        FORWARDER,
    ),
    # forwarder concurrency (forwarder/concurrency.py, docs/performance.md)
    Option(
        "max_workers",
        ("--max-workers",),
        _positive_int,
        None,
        "uploads at once the forwarder may grow to from --workers while throughput rises "
        f"(default {DEFAULT_MAX_WORKERS}, or --workers if more); equal to --workers: fixed",
        FORWARDER,
    ),
    # http
    Option(
        "http_port",
        ("--http-port",),
        _port,
        8080,
        "port for /healthz, /readyz and /metrics (0 disables)",
        HTTP,
    ),
    Option("http_host", ("--http-host",), _text, "0.0.0.0", "address for the HTTP endpoints", HTTP),
    Option(
        "min_free_disk",
        ("--min-free-disk",),
        _bytes,
        1024**3,
        "below this much free space in the spool, stop accepting",
        HTTP,
    ),
    # http api (stowaway/api): actions need a token from this file
    Option(
        "admin_token_file",
        ("--admin-token-file",),
        _path,
        None,
        "file of name:token lines; the HTTP API's actions (requeue, purge, reroute) need "
        "Authorization: Bearer <token> from it (without it the API is read-only)",
        HTTP,
    ),
    # routing
    Option(
        "destinations",
        ("--destinations",),
        _path,
        None,
        "destinations file (YAML or JSON): several destinations and the rules that route "
        "to them (docs/routing.md)",
        ROUTING,
    ),
    Option(
        "destination_config_path",
        ("--destination-config-path", "--destination_config_path"),
        _path,
        None,
        "destination config in Google's adapter's JSON format, from a file",
        ROUTING,
    ),
    Option(
        "destination_config_inline",
        ("--destination-config-inline", "--destination_config_inline"),
        _text,
        None,
        "destination config in Google's adapter's JSON format, inline",
        ROUTING,
    ),
    # de-identification and compression on the way out (Google's flags; a destinations
    # file entry has its own ``redact:`` and ``transcode:``)
    Option(
        "redact_remove_list",
        ("--redact-remove-list", "--redact_remove_list"),
        _text,
        "",
        "Google's flag: empty these tags (comma-separated keywords or 8-digit hex) in "
        "what the flags' destinations are sent",
        DEIDENTIFY,
    ),
    Option(
        "redact_keep_list",
        ("--redact-keep-list", "--redact_keep_list"),
        _text,
        "",
        "Google's flag: remove every tag but these (and what an instance needs)",
        DEIDENTIFY,
    ),
    Option(
        "redact_filter_profile",
        ("--redact-filter-profile", "--redact_filter_profile"),
        _text,
        "",
        "Google's flag: CHC_BASIC (Google's profile) or DICOM_BASIC (PS3.15 Annex E)",
        DEIDENTIFY,
    ),
    Option(
        "redact_uid_key_file",
        ("--redact-uid-key-file",),
        _path,
        None,
        "with the --redact_* flags: replace UIDs with a keyed hash under this secret "
        "file (default: Google's unkeyed UIDs)",
        DEIDENTIFY,
    ),
    Option(
        "store_compress_to_transfer_syntax",
        ("--store-compress-to-transfer-syntax", "--store_compress_to_transfer_syntax"),
        _text,
        "",
        "Google's flag: compress what the flags' destinations are sent to this lossless "
        "transfer syntax UID (1.2.840.10008.1.2.4.90, .4.80, .1.2.5)",
        DEIDENTIFY,
    ),
    Option(
        "send_to_all_matching_destinations",
        ("--send-to-all-matching-destinations", "--send_to_all_matching_destinations"),
        _bool,
        False,
        "with Google's destination config: every matching entry gets the instance",
        ROUTING,
        switch=True,
    ),
    # receiver processes (docs/configuration.md, "Receiving on every core")
    Option(
        "processes",
        ("--processes",),
        _processes,
        None,
        "receiver processes sharing the DICOM port (default auto: the CPUs this "
        "container may use; 1: receive in the main process)",
        RECEIVER,
    ),
)

# storage commitment (its own group: serve and receive take it)
OPTIONS += (
    Option(
        "commitment_timeout",
        ("--commitment-timeout",),
        _seconds,
        3600.0,
        "storage commitment: an instance not delivered everywhere this long after the "
        "request is reported failed (0x0110)",
        COMMITMENT,
    ),
    Option(
        "commitment_verify",
        ("--commitment-verify",),
        _bool,
        False,
        "storage commitment: before committing an instance, find it at each DICOMweb "
        "destination it was delivered to (QIDO-RS)",
        COMMITMENT,
        switch=True,
    ),
    Option(
        "commitment_poll",
        ("--commitment-poll",),
        _seconds,
        2.0,
        "storage commitment: how often open requests are looked at again",
        COMMITMENT,
    ),
    Option(
        "commitment_report_for",
        ("--commitment-report-for",),
        _seconds,
        86400.0,
        "storage commitment: how long a report the requester does not take is retried "
        "(with --backoff-initial/--backoff-max) before the request is abandoned",
        COMMITMENT,
    ),
)

# retention (its own group: serve and forward take it)
OPTIONS += (
    Option(
        "retain_done",
        ("--retain-done",),
        _seconds,
        7 * 86400.0,
        "delete done rows (and their history) this long after they were forwarded, in "
        "small batches; 0 keeps them all (docs/operations.md)",
        RETENTION,
        metavar="AGE",
    ),
)

OPTIONS_BY_NAME = {o.name: o for o in OPTIONS}


@dataclass(frozen=True)
class Settings:
    """Validated configuration; see ``OPTIONS`` for each field's meaning."""

    data_dir: Path = Path("stowaway-data")
    db_url: str = ""
    db_connect_timeout: float = 10.0
    db_statement_timeout: float = 30.0
    db_keepalives_idle: float = 30.0
    db_keepalives_interval: float = 10.0
    db_keepalives_count: int = 3
    spool_dir: Path = Path("stowaway-data/spool")
    node_id: str = ""
    log_level: str = "info"
    log_format: str = "text"
    aet: str = "IMPORTADAPTER"
    #: more called AE titles answered besides ``aet`` (``--aet A,B``)
    aet_aliases: tuple[str, ...] = ()
    port: int = 2575
    host: str = "0.0.0.0"
    allowed_calling_aets: tuple[str, ...] = ()
    max_associations: int = 20
    idle_timeout: float = 60.0
    max_pdu: int = 262144
    max_instance_size: int = 4 * 1024**3
    tls_port: int = 0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    tls_only: bool = False
    allowed_peers: tuple[str, ...] = ()
    query_url: str | None = None
    query_destination: str | None = None
    fuzzy_matching: bool = False
    aet_dictionary: Path | None = None
    aet_dictionary_inline: str | None = None
    cmove_aet: str | None = None
    query_max_per_peer: int = 2
    query_max_results: int = 10_000
    query_page_size: int = 500
    query_timeout: float = 60.0
    #: The C-MOVE destinations by AE title, from the AE dictionary's first source.
    move_destinations: Mapping[str, MoveDestination] = field(default_factory=dict)
    grace_period: float = 30.0
    dicomweb_url: str | None = None
    auth: str | None = None
    bearer_token_file: Path | None = None
    basic_user: str | None = None
    basic_password_file: Path | None = None
    ca_bundle: Path | None = None
    workers: int = 4
    sender_first: float = 10.0
    batch_max_instances: int = BATCH_MAX_INSTANCES
    batch_max_bytes: int = BATCH_MAX_BYTES
    backoff_initial: float = 2.0
    backoff_max: float = 600.0
    max_attempts: int | None = None
    on_conflict: str = "fail"
    keep_done: float = 0.0
    lease: float = 300.0
    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    poll_interval: float = 1.0
    # forwarder concurrency
    max_workers: int | None = None
    http_port: int = 8080
    http_host: str = "0.0.0.0"
    min_free_disk: int = 1024**3
    admin_token_file: Path | None = None
    #: ``STOWAWAY_ADMIN_TOKEN_FILE`` named this file and there was none (an optional
    #: Kubernetes Secret not created): the API is read-only, and start-up says so.
    admin_token_file_absent: Path | None = None
    destinations: Path | None = None
    destination_config_path: Path | None = None
    destination_config_inline: str | None = None
    send_to_all_matching_destinations: bool = False
    retain_done: float = 7 * 86400.0
    #: Google's ENV_DESTINATION_CONFIG_JSON: its config when neither flag gives one.
    destination_config_env: str | None = None
    commitment_timeout: float = 3600.0
    commitment_verify: bool = False
    commitment_poll: float = 2.0
    commitment_report_for: float = 86400.0
    #: receiver processes (None: auto, see ``stowaway.receiver_pool.receiver_processes``)
    processes: int | None = None
    redact_remove_list: str = ""
    redact_keep_list: str = ""
    redact_filter_profile: str = ""
    redact_uid_key_file: Path | None = None
    store_compress_to_transfer_syntax: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def sqlite_default(self) -> bool:
        return self.db_url.startswith("sqlite")

    @property
    def postgres_timeouts(self) -> PostgresTimeouts:
        """The ``--db-*`` timeouts, for :func:`stowaway.db.engine.make_engine`."""
        from stowaway.db.engine import PostgresTimeouts

        return PostgresTimeouts(
            connect=self.db_connect_timeout,
            statement=self.db_statement_timeout,
            keepalives_idle=self.db_keepalives_idle,
            keepalives_interval=self.db_keepalives_interval,
            keepalives_count=self.db_keepalives_count,
        )

    @property
    def upload_limit(self) -> int:
        """The most uploads at once a DICOMweb destination's forwarder grows to."""
        return self.max_workers or max(DEFAULT_MAX_WORKERS, self.workers)

    @property
    def query_source(self) -> str | None:
        """The DICOMweb store query/retrieve reads from: --query-url, else --dicomweb-url;
        None when off."""
        if self.query_url == QUERY_OFF:
            return None
        return self.query_url or self.dicomweb_url


def add_options(parser: argparse.ArgumentParser, groups: set[str]) -> None:
    """Add the flags of ``groups`` to a (sub)command parser."""
    for option in OPTIONS:
        if option.group not in groups:
            continue
        default = "" if option.default in (None, ()) else option.default
        if option.switch:
            parser.add_argument(
                *option.flags,
                dest=option.name,
                action="store_const",
                const="true",
                default=None,
                help=f"{option.help} [env {option.env}=true]",
            )
            continue
        parser.add_argument(
            *option.flags,
            dest=option.name,
            default=None,
            metavar=option.metavar or option.name.upper(),
            help=f"{option.help} [env {option.env}; default {default or 'none'}]",
        )


def load_settings(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from parsed flags, then the environment, then defaults."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for option in OPTIONS:
        raw = getattr(args, option.name, None)
        source = option.flag
        if raw is None and option.env in environ:
            raw, source = environ[option.env], option.env
        if raw is None:
            values[option.name] = option.default
            continue
        try:
            values[option.name] = option.parse(str(raw))
        except ValueError as exc:
            raise SettingsError(f"{source}: {exc} (got {_redact(str(raw))!r})") from None
    values["destination_config_env"] = environ.get(GOOGLE_DESTINATION_CONFIG_ENV)
    titles = values["aet"]
    if isinstance(titles, tuple):  # parsed from a flag or variable
        if not titles:
            raise SettingsError("--aet: give at least one AE title")
        values["aet"], values["aet_aliases"] = titles[0], tuple(dict.fromkeys(titles[1:]))
    data_dir: Path = values["data_dir"]
    values["db_url"] = values["db_url"] or f"sqlite:///{data_dir / 'queue.db'}"
    values["spool_dir"] = values["spool_dir"] or data_dir / "spool"
    if values["max_instance_size"] < 1:
        raise SettingsError("--max-instance-size: must be at least 1 byte")
    if values["max_workers"] is not None and values["max_workers"] < values["workers"]:
        raise SettingsError("--max-workers: must be at least --workers")
    if values["backoff_initial"] > values["backoff_max"]:
        raise SettingsError("--backoff-initial: must not exceed --backoff-max")
    if not values["db_url"].startswith(("sqlite", "postgres")):
        raise SettingsError(
            f"--db-url: use sqlite:///PATH or postgresql+psycopg://... "
            f"(got a {values['db_url'].split(':', 1)[0]}: URL)"
        )
    # Only a command that runs the receiver parses its flags; only there are the
    # TLS files opened (a forwarder pod sharing the variables need not mount them).
    if "tls_port" in vars(args):
        _check_receiver(values)
        _check_query(values, environ)
    if values["admin_token_file"] is not None:
        from_environment = getattr(args, "admin_token_file", None) is None
        if from_environment and not os.path.lexists(values["admin_token_file"]):
            # A manifest's optional Secret that was never created: read-only, not a
            # crash loop. A flag is the operator's own word, so a missing file is an error.
            values["admin_token_file_absent"] = values["admin_token_file"]
            values["admin_token_file"] = None
        else:
            _check_admin_tokens(values["admin_token_file"])
    if "retain_done" in vars(args):
        _check_retention(values)
    settings = Settings(**values)
    if "destinations" in vars(args):
        _check_destinations(settings)
    # ``check`` reports an unreadable UID key as a failed check instead.
    if "redact_remove_list" in vars(args) and not getattr(args, "preflight", False):
        _check_outbound(settings)
    return settings


def _check_outbound(settings: Settings) -> None:
    """Where this command forwards: every redacting destination's UID key file is readable
    (a receive-only process never reads it)."""
    from stowaway.destinations import DestinationConfigError, check_outbound

    try:
        check_outbound(settings)
    except DestinationConfigError as exc:
        raise SettingsError(str(exc)) from None


def _check_admin_tokens(path: Path) -> None:
    """The admin token file reads and holds at least one well-formed ``name:token``."""
    from stowaway.api.tokens import AdminTokens, TokenFileError

    try:
        AdminTokens(path)
    except TokenFileError as exc:
        raise SettingsError(f"--admin-token-file: {exc}") from None


def _check_retention(values: dict[str, Any]) -> None:
    """Rows outlive the spool files ``--keep-done`` keeps (retention deletes both)."""
    retain, keep = values["retain_done"], values.get("keep_done", 0.0)
    if retain and retain < keep:
        raise SettingsError(
            f"--retain-done: {retain:g} s is shorter than --keep-done ({keep:g} s); "
            "done rows must be kept at least as long as their files (or 0: keep every row)"
        )


def _check_destinations(settings: Settings) -> None:
    """The destinations and rules parse, and only one way of giving them is used."""
    from stowaway.destinations import DestinationConfigError, destination_config

    try:
        destination_config(settings)
    except DestinationConfigError as exc:
        raise SettingsError(str(exc)) from None


def _check_receiver(values: dict[str, Any]) -> None:
    """TLS settings that make sense together, with files that can serve."""
    from stowaway.receiver.tls import TLSConfigError, server_context

    if values["tls_only"] and not values["tls_port"]:
        raise SettingsError("--tls-only: needs --tls-port")
    if not values["tls_port"]:
        for name in ("tls_cert", "tls_key", "tls_ca"):
            if values[name] is not None:
                flag = OPTIONS_BY_NAME[name].flag
                raise SettingsError(f"{flag}: has no effect without --tls-port")
        return
    if values["tls_cert"] is None or values["tls_key"] is None:
        raise SettingsError("--tls-port: needs --tls-cert and --tls-key")
    if values["tls_port"] == values["port"] and not values["tls_only"]:
        raise SettingsError("--tls-port: must differ from --port (or add --tls-only)")
    try:
        server_context(values["tls_cert"], values["tls_key"], values["tls_ca"])
    except TLSConfigError as exc:
        raise SettingsError(str(exc)) from None


#: QIDO-RS page sizes above this are cut by the Healthcare API (5000 for studies and
#: series), and a cut page would look like the last one.
MAX_QUERY_PAGE_SIZE = 5000
#: pynetdicom's sub-operation counts are US.
MAX_QUERY_RESULTS = 65535


def _check_query(values: dict[str, Any], environ: Mapping[str, str]) -> None:
    """Query/retrieve limits in range, and the AE dictionary readable, at start-up."""
    from stowaway.receiver.aet_dictionary import AetDictionaryError, load

    if values["query_page_size"] > MAX_QUERY_PAGE_SIZE:
        raise SettingsError(f"--query-page-size: at most {MAX_QUERY_PAGE_SIZE}")
    if values["query_max_results"] > MAX_QUERY_RESULTS:
        raise SettingsError(f"--query-max-results: at most {MAX_QUERY_RESULTS}")
    try:
        values["move_destinations"] = load(
            values["aet_dictionary_inline"], values["aet_dictionary"], environ
        )
    except AetDictionaryError as exc:
        raise SettingsError(str(exc)) from None


def describe(settings: Settings) -> dict[str, Any]:
    """Settings safe to log: passwords in URLs are masked."""
    from sqlalchemy.engine import make_url

    shown: dict[str, Any] = {}
    for option in OPTIONS:
        value = getattr(settings, option.name)
        if option.name == "db_url":
            value = make_url(value).render_as_string(hide_password=True)
        shown[option.name] = str(value) if isinstance(value, Path) else value
    return shown
