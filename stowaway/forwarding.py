"""Builds the forwarders from the settings: one per destination, each with its own
workers, client (STOW-RS or DIMSE), retry policy and delivery state."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import timedelta

from stowaway import __version__
from stowaway.destinations import GOOGLE_FLAGS, DestinationConfig, destination_config
from stowaway.forwarder.auth import AuthConfigError, CredentialsError, build_auth
from stowaway.forwarder.deidentify import UidKeyError
from stowaway.forwarder.destinations import (
    ConflictPolicy,
    Destination,
    DicomwebDestination,
    DimseDestination,
)
from stowaway.forwarder.dimse import DimseClient
from stowaway.forwarder.outbound import OutboundPipeline
from stowaway.forwarder.retry import RetryPolicy
from stowaway.forwarder.stow import StowClient
from stowaway.forwarder.worker import (
    DeliveryClient,
    FailureReport,
    Forwarder,
    ForwarderConfig,
    UploadReport,
)
from stowaway.runtime import StartupError, State
from stowaway.settings import Settings

log = logging.getLogger("stowaway")

#: What the ``google`` UID scheme gives away, said once at start-up when it is in use.
GOOGLE_UID_WARNING = (
    "replacement UIDs are Google's unkeyed MD5 name-based UIDs: anyone who knows or guesses "
    "an original UID can compute its replacement and so confirm which patient a "
    "de-identified instance belongs to; kept so that a store Google's adapter filled keeps "
    "deduplicating. For UIDs only a key holder can link, give --redact-uid-key-file "
    "(or uid_scheme: keyed with uid_key_file in the destinations file)"
)


def stow_client_factory(destination: DicomwebDestination) -> Callable[[], StowClient]:
    """One pooled client per worker thread, sharing one auth object."""
    where = f"destination {destination.name!r}: auth"
    try:
        auth = build_auth(
            destination.auth,
            bearer_token_file=destination.bearer_token_file,
            basic_user=destination.basic_user,
            basic_password_file=destination.basic_password_file,
        )
    except AuthConfigError as exc:
        raise StartupError(f"{where}: {exc}") from None
    except CredentialsError as exc:
        raise StartupError(f"{where} google: {exc}") from None
    ca_bundle = str(destination.ca_bundle) if destination.ca_bundle else None

    def make() -> StowClient:
        return StowClient(
            destination.url,
            auth,
            connect_timeout=destination.delivery.connect_timeout,
            read_timeout=destination.read_timeout,
            ca_bundle=ca_bundle,
            user_agent=f"stowaway/{__version__}",
        )

    make().close()  # validate the URL and CA bundle at start-up
    return make


def client_factory(destination: Destination) -> Callable[[], DeliveryClient]:
    if isinstance(destination, DimseDestination):
        if destination.tls is not None:
            # Load the certificates once now, so a bad file stops start-up.
            DimseClient(destination)
        return lambda: DimseClient(destination)
    return stow_client_factory(destination)


def _named(
    callback: Callable[[bool, str | None, str], None], name: str
) -> Callable[[bool, str | None], None]:
    """A forwarder's on_destination, told which destination it is about."""
    return lambda blocked, reason: callback(blocked, reason, name)


def where(destination: Destination) -> str:
    """Where a destination is, for operators: its URL, or ``dimse://AET@host:port``."""
    if isinstance(destination, DimseDestination):
        return f"dimse://{destination.called_aet}@{destination.host}:{destination.port}"
    return destination.url


class Forwarders:
    """The forwarders of every destination, started and stopped together."""

    def __init__(self, forwarders: Sequence[Forwarder]) -> None:
        self.forwarders = list(forwarders)

    def start(self) -> None:
        for forwarder in self.forwarders:
            forwarder.start()

    def stop(self, grace: float) -> None:
        """Each forwarder finishes the upload in hand within ``grace`` (in parallel:
        the grace period is not multiplied by the number of destinations)."""
        for forwarder in self.forwarders:
            forwarder.request_stop()
        for forwarder in self.forwarders:
            forwarder.stop(grace)


def outbound_pipeline(
    destination: Destination,
    state: State,
    on_outbound: Callable[[str, str], None] = lambda _e, _n: None,
) -> OutboundPipeline | None:
    """The destination's redaction and compression, ready (its UID key read); None when
    it gets instances as received."""
    outbound = destination.outbound
    if not outbound.changes_instances:
        return None
    try:
        pipeline = OutboundPipeline(
            outbound,
            state.spool.root / "outgoing",
            destination=destination.name,
            needs_file=isinstance(destination, DimseDestination),
            on_event=lambda event: on_outbound(event, destination.name),
        )
    except UidKeyError as exc:
        raise StartupError(f"destination {destination.name!r} ({outbound.source}): {exc}") from None
    log.info(
        "destination_outbound",
        extra={
            "destination": destination.name,
            "applied": outbound.describe(),
            "configured_by": outbound.source,
        },
    )
    return pipeline


def warn_google_uids(config: DestinationConfig) -> None:
    """One warning when any destination replaces UIDs with Google's unkeyed scheme."""
    names = [
        d.name
        for d in config.destinations
        if d.outbound.redaction is not None and d.outbound.redaction.uid_scheme.value == "google"
    ]
    if names:
        from_flags = any(
            d.outbound.source == GOOGLE_FLAGS for d in config.destinations if d.name in names
        )
        log.warning(
            "redaction_uids_unkeyed",
            extra={
                "destinations": ",".join(names),
                "configured_by": GOOGLE_FLAGS if from_flags else "uid_scheme: google",
                "detail": GOOGLE_UID_WARNING,
            },
        )


def build_forwarder(
    settings: Settings,
    state: State,
    *,
    on_upload: Callable[[UploadReport], None] = lambda _r: None,
    on_destination: Callable[[bool, str | None, str], None] = lambda _b, _r, _n: None,
    receiving_for: Callable[[], float | None] = lambda: None,
    on_failed: Callable[[FailureReport], None] = lambda _r: None,
    on_outbound: Callable[[str, str], None] = lambda _e, _n: None,
) -> Forwarders:
    """A forwarder per configured destination (``--dicomweb-url`` alone: one)."""
    config = destination_config(settings)
    if config is None:
        raise StartupError("forward: give --dicomweb-url, --destinations or a destination config")
    warn_google_uids(config)
    forwarders = []
    for destination in config.destinations:
        delivery = destination.delivery
        overwrite = (
            isinstance(destination, DicomwebDestination)
            and destination.on_conflict == ConflictPolicy.OVERWRITE
        )
        batch_instances = (
            destination.batch_max_instances
            if isinstance(destination, DicomwebDestination)
            else destination.instances_per_association
        )
        batch_bytes = (
            destination.batch_max_bytes
            if isinstance(destination, DicomwebDestination)
            else settings.batch_max_bytes
        )
        forwarder_config = ForwarderConfig(
            destination=destination.name,
            destination_url=where(destination),
            workers=delivery.workers,
            # DIMSE: a fixed number of associations (a PACS may refuse more).
            max_workers=(
                max(delivery.workers, settings.upload_limit)
                if isinstance(destination, DicomwebDestination)
                else delivery.workers
            ),
            batch_max_instances=batch_instances,
            batch_max_bytes=batch_bytes,
            lease=timedelta(seconds=settings.lease),
            poll_interval=settings.poll_interval,
            retry=RetryPolicy(
                delivery.backoff_initial, delivery.backoff_max, delivery.max_attempts
            ),
            overwrite_on_conflict=overwrite,
            keep_done=timedelta(seconds=settings.keep_done),
            node_id=settings.node_id,
            sender_first=timedelta(seconds=settings.sender_first),
        )
        forwarders.append(
            Forwarder(
                forwarder_config,
                state.queue,
                state.spool,
                client_factory(destination),
                on_upload=on_upload,
                on_destination=_named(on_destination, destination.name),
                receiving_for=receiving_for,
                on_failed=on_failed,
                outbound=outbound_pipeline(destination, state, on_outbound),
            )
        )
    return Forwarders(forwarders)
