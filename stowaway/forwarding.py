"""Builds the forwarder from the settings (auth, STOW-RS client, retry policy)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from stowaway import __version__
from stowaway.forwarder.auth import (
    AuthConfigError,
    AuthKind,
    CredentialsError,
    build_auth,
    default_auth_kind,
)
from stowaway.forwarder.retry import RetryPolicy
from stowaway.forwarder.stow import StowClient
from stowaway.forwarder.worker import Forwarder, ForwarderConfig, UploadReport
from stowaway.runtime import StartupError, State
from stowaway.settings import Settings


def auth_kind(settings: Settings) -> AuthKind:
    assert settings.dicomweb_url is not None
    return AuthKind(settings.auth) if settings.auth else default_auth_kind(settings.dicomweb_url)


def build_client_factory(settings: Settings) -> Callable[[], StowClient]:
    """One pooled client per worker thread, sharing one auth object."""
    assert settings.dicomweb_url is not None
    try:
        auth = build_auth(
            auth_kind(settings),
            bearer_token_file=settings.bearer_token_file,
            basic_user=settings.basic_user,
            basic_password_file=settings.basic_password_file,
        )
    except AuthConfigError as exc:
        raise StartupError(f"--auth: {exc}") from None
    except CredentialsError as exc:
        # Not fatal: the destination is marked blocked and probed until it works.
        raise StartupError(f"--auth google: {exc}") from None
    url = settings.dicomweb_url
    ca_bundle = str(settings.ca_bundle) if settings.ca_bundle else None

    def make() -> StowClient:
        return StowClient(
            url,
            auth,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            ca_bundle=ca_bundle,
            user_agent=f"stowaway/{__version__}",
        )

    make().close()  # validate the URL and CA bundle at start-up
    return make


def build_forwarder(
    settings: Settings,
    state: State,
    *,
    on_upload: Callable[[UploadReport], None] = lambda _r: None,
    on_destination: Callable[[bool, str | None], None] = lambda _b, _r: None,
    receiving_for: Callable[[], float | None] = lambda: None,
) -> Forwarder:
    assert settings.dicomweb_url is not None
    config = ForwarderConfig(
        destination=settings.dicomweb_url,
        workers=settings.workers,
        batch_max_instances=settings.batch_max_instances,
        batch_max_bytes=settings.batch_max_bytes,
        lease=timedelta(seconds=settings.lease),
        poll_interval=settings.poll_interval,
        retry=RetryPolicy(settings.backoff_initial, settings.backoff_max, settings.max_attempts),
        overwrite_on_conflict=settings.on_conflict == "overwrite",
        keep_done=timedelta(seconds=settings.keep_done),
        node_id=settings.node_id,
        sender_first=timedelta(seconds=settings.sender_first),
    )
    return Forwarder(
        config,
        state.queue,
        state.spool,
        build_client_factory(settings),
        on_upload=on_upload,
        on_destination=on_destination,
        receiving_for=receiving_for,
    )
