"""Builds storage commitment (docs/storage-commitment.md) from the settings: the N-ACTION
service the receiver's AE offers, and the reporter that sends each N-EVENT-REPORT."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from stowaway import __version__
from stowaway.backoff import RetryPolicy
from stowaway.db.commitments import Commitments, Recorded
from stowaway.destinations import destination_config, settings_for
from stowaway.forwarder.destinations import DicomwebDestination
from stowaway.receiver.commitment_reporter import Reporter, ReporterConfig, ReportOutcome, Verify
from stowaway.receiver.scp import ExtraServices
from stowaway.receiver.storage_commitment import OpenAssociations, StorageCommitmentService
from stowaway.runtime import StartupError, State
from stowaway.settings import Settings
from stowaway.text import first_line

log = logging.getLogger("stowaway.commitment")


@dataclass
class StorageCommitment:
    """The service (for the receiver's AE) and its reporter (started with it)."""

    services: ExtraServices
    reporter: Reporter


def process_id(settings: Settings) -> str:
    """This process among those sharing the queue: its leases and its associations
    (``NODE:PID:RANDOM``, the node being ``--node-id`` or the host name)."""
    return f"{_node(settings)}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _node(settings: Settings) -> str:
    return settings.node_id or socket.gethostname()


def dead_here(settings: Settings, me: str) -> Callable[[str], bool]:
    """Whether a lease owner was a process of this node that no longer runs: the same node
    and a process id that is ours (a restarted container: its previous run) or that no
    process has. Owners elsewhere are never judged; their leases expire."""
    node = _node(settings)

    def is_dead(owner: str) -> bool:
        parts = owner.rsplit(":", 2)
        if len(parts) != 3 or parts[0] != node or not parts[1].isdigit() or owner == me:
            return False
        pid = int(parts[1])
        if pid == os.getpid():
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False

    return is_dead


def build_storage_commitment(
    settings: Settings,
    state: State,
    *,
    on_request: Callable[[Recorded], None] = lambda _r: None,
    on_report: Callable[[ReportOutcome], None] = lambda _o: None,
) -> StorageCommitment:
    commitments = Commitments(state.engine)
    owner = process_id(settings)
    associations = OpenAssociations()
    requesters = dict(settings.move_destinations)
    service = StorageCommitmentService(
        commitments,
        process_id=owner,
        is_known=lambda aet: aet in requesters,
        associations=associations,
        on_request=on_request,
    )
    reporter = Reporter(
        ReporterConfig(
            aet=settings.aet,
            timeout=timedelta(seconds=settings.commitment_timeout),
            report_for=timedelta(seconds=settings.commitment_report_for),
            poll_interval=settings.commitment_poll,
            retry=RetryPolicy(settings.backoff_initial, settings.backoff_max),
            network_timeout=min(30.0, settings.idle_timeout),
        ),
        commitments,
        owner=owner,
        requesters=requesters,
        associations=associations,
        verify=build_verify(settings) if settings.commitment_verify else None,
        on_report=on_report,
        is_dead=dead_here(settings, owner),
    )
    services = ExtraServices(
        role_contexts=tuple(service.contexts), handlers=tuple(service.handlers())
    )
    return StorageCommitment(services, reporter)


def build_verify(settings: Settings) -> Verify:
    """``--commitment-verify``: one QIDO-RS search per instance and DICOMweb destination
    (``instances?00080018=UID``, as Google's adapter asks its store); a DICOM destination
    cannot be asked and counts as found."""
    from stowaway.dicomweb.client import DicomwebReader, ReaderConfig
    from stowaway.forwarder.auth import (
        AuthConfigError,
        AuthKind,
        CredentialsError,
        build_auth,
        default_auth_kind,
    )

    config = destination_config(settings)
    readers: dict[str, DicomwebReader] = {}
    for destination in config.destinations if config else ():
        if not isinstance(destination, DicomwebDestination):
            continue
        lent = settings_for(settings, destination)
        url = destination.url
        kind = AuthKind(lent.auth) if lent.auth else default_auth_kind(url)
        try:
            auth = build_auth(
                kind,
                bearer_token_file=lent.bearer_token_file,
                basic_user=lent.basic_user,
                basic_password_file=lent.basic_password_file,
            )
        except (AuthConfigError, CredentialsError) as exc:
            raise StartupError(
                f"--commitment-verify: destination {destination.name!r}: {first_line(exc)}"
            ) from None
        readers[destination.name] = DicomwebReader(
            ReaderConfig(
                base_url=url,
                connect_timeout=lent.connect_timeout,
                read_timeout=settings.query_timeout,
                ca_bundle=str(lent.ca_bundle) if lent.ca_bundle else None,
                user_agent=f"stowaway/{__version__}",
            ),
            auth,
        )

    def verify(destination: str, sop_instance_uid: str) -> bool:
        reader = readers.get(destination)
        if reader is None:
            return True
        try:
            pages = reader.search("instances", [("00080018", sop_instance_uid)], page_size=1)
            return any(True for _page in pages)
        except Exception as exc:  # requests and DICOMweb errors: not verified this time
            log.warning(
                "commitment_verify_failed",
                extra={"destination": destination, "error": first_line(exc, 200)},
            )
            return False

    return verify
