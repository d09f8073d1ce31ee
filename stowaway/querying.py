"""Builds query/retrieve (C-FIND, C-MOVE, C-GET over DICOMweb) from the settings."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path

from stowaway import __version__
from stowaway.destinations import destination_config, settings_for
from stowaway.forwarder.destinations import DicomwebDestination
from stowaway.receiver.scp import ExtraServices
from stowaway.runtime import StartupError
from stowaway.settings import Settings
from stowaway.text import first_line

log = logging.getLogger("stowaway.query")

#: Where an instance being sent by C-MOVE/C-GET waits, under the data directory.
RETRIEVE_DIR = "retrieve"


def query_settings(settings: Settings) -> Settings:
    """The settings query/retrieve reads the store with: ``--query-destination NAME``
    (else the routing's default destination, when it is a DICOMweb one and no
    ``--query-url`` is given) lends its URL, auth and CA bundle."""
    if settings.query_url is not None:
        return settings
    config = destination_config(settings)
    name = settings.query_destination or (config.routing.default if config else None)
    if config is None or name is None:
        return settings
    chosen = next((d for d in config.destinations if d.name == name), None)
    if not isinstance(chosen, DicomwebDestination):
        raise StartupError(f"--query-destination: {name!r} is not a DICOMweb destination")
    return dataclasses.replace(settings_for(settings, chosen), query_url=chosen.url)


def build_query_services(settings: Settings) -> ExtraServices:
    """The receiver's query/retrieve services; none without a store to read from."""
    settings = query_settings(settings)
    url = settings.query_source
    if url is None:
        return ExtraServices()
    # Imported only when used: a receiver without a store to read starts as fast as before.
    from stowaway.dicomweb.client import DicomwebReader, ReaderConfig
    from stowaway.forwarder.auth import (
        AuthConfigError,
        AuthKind,
        CredentialsError,
        build_auth,
        default_auth_kind,
    )
    from stowaway.forwarder.outcome import explain_permission_error
    from stowaway.receiver.query_retrieve import QueryLimits, QueryRetrieveService

    kind = AuthKind(settings.auth) if settings.auth else default_auth_kind(url)
    try:
        auth = build_auth(
            kind,
            bearer_token_file=settings.bearer_token_file,
            basic_user=settings.basic_user,
            basic_password_file=settings.basic_password_file,
        )
    except (AuthConfigError, CredentialsError) as exc:
        # Receiving must not depend on the read side: it runs without query/retrieve.
        log.error(
            "query_retrieve_disabled",
            extra={"reason": f"--auth {kind}: {first_line(exc, 300)}", "store": url},
        )
        return ExtraServices()
    reader = DicomwebReader(
        ReaderConfig(
            base_url=url,
            connect_timeout=min(settings.connect_timeout, settings.query_timeout),
            read_timeout=settings.query_timeout,
            ca_bundle=str(settings.ca_bundle) if settings.ca_bundle else None,
            user_agent=f"stowaway/{__version__}",
            fuzzy_matching=settings.fuzzy_matching,
        ),
        auth,
    )
    work_dir = settings.data_dir / RETRIEVE_DIR
    _remove_leftovers(work_dir)
    service = QueryRetrieveService(
        reader,
        aet=settings.aet,
        limits=QueryLimits(
            max_per_peer=settings.query_max_per_peer,
            max_results=settings.query_max_results,
            page_size=settings.query_page_size,
        ),
        destinations=settings.move_destinations,
        work_dir=work_dir,
        cmove_aet=settings.cmove_aet,
        explain_denied=explain_permission_error,
    )
    return ExtraServices(contexts=service.contexts, handlers=tuple(service.handlers()))


def _remove_leftovers(work_dir: Path) -> None:
    """Instances a killed process was sending: nothing will send them now."""
    for stale in work_dir.glob("*.dcm"):
        with contextlib.suppress(OSError):
            stale.unlink()
