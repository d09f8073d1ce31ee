"""Long-running subcommands: ``serve``, ``receive`` and ``forward``."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING

from stowaway import stop_signal
from stowaway.db.reconcile import safe_startup_reconcile
from stowaway.destinations import destination_config
from stowaway.health import (
    HealthMonitor,
    HealthServer,
    Readiness,
    ReadinessReport,
    readiness_checks,
)
from stowaway.metrics import Metrics
from stowaway.receiver.commitment_reporter import Reporter
from stowaway.receiver.scp import ExtraServices, Receiver, ReceiverConfig
from stowaway.receiver.store import StoreHandler, StoreOutcome
from stowaway.receiver_pool import ReceiverPool, receiver_processes
from stowaway.retention import QueueUpkeep
from stowaway.runtime import State, open_state
from stowaway.settings import Settings, describe

if TYPE_CHECKING:
    from stowaway.api.context import ApiContext
    from stowaway.destinations import DestinationConfig

log = logging.getLogger("stowaway")


#: The receiver counts as busy this long after it stored an instance.
RECEIVING_WINDOW = 0.5


class ReceiveActivity:
    """Whether the receiver is taking instances in, and since when (for ``serve``'s forwarder).

    A transfer is a run of C-STOREs with no gap of ``window`` seconds or more.
    """

    def __init__(self, window: float = RECEIVING_WINDOW) -> None:
        self.window = window
        self._first = self._last = float("-inf")

    def stored(self) -> None:
        now = time.monotonic()
        if now - self._last >= self.window:
            self._first = now
        self._last = now

    def receiving_for(self) -> float | None:
        """Seconds since the ongoing transfer began, or None between transfers."""
        now = time.monotonic()
        if now - self._last >= self.window:
            return None
        return now - self._first


def run(settings: Settings, *, receive: bool, forward: bool, retention: bool = False) -> int:
    """Run the receiver and/or the forwarder until SIGTERM; exit code 0 on a clean stop.

    ``retention``: delete done rows older than ``--retain-done`` (``serve``,
    ``forward``); every process folds the queue's counts (:mod:`stowaway.retention`).
    """
    state = open_state(settings)
    log.info("starting", extra={"receive": receive, "forward": forward, **describe(settings)})
    if settings.admin_token_file_absent is not None and settings.http_port:
        log.warning(
            "admin_token_file_absent",
            extra={
                "path": str(settings.admin_token_file_absent),
                "reason": f"STOWAWAY_ADMIN_TOKEN_FILE names {settings.admin_token_file_absent}, "
                "which does not exist: the HTTP API is read-only (create the file, on "
                "Kubernetes the Secret stowaway-admin-tokens, then restart to enable actions)",
            },
        )
    metrics = Metrics()
    routes = destination_config(settings)  # checked at start-up (load_settings)
    forwarded_to = [d.name for d in routes.destinations] if forward and routes else []
    metrics.runs(receive=receive, forward=forward)
    metrics.watch_queue(state.queue, forwarded_to)
    # The floor is the receiver's: a forward-only process does not stop for it.
    metrics.watch_disk(state.spool.root, settings.min_free_disk if receive else None)
    activity = ReceiveActivity()

    def on_store(outcome: StoreOutcome) -> None:
        metrics.on_store(outcome)
        activity.stored()

    # --processes N: N receiver processes behind this one (stowaway/receiver_pool.py).
    processes = receiver_processes(settings) if receive else 1
    pool = (
        ReceiverPool(
            settings,
            processes,
            on_outcome=on_store,
            on_association=metrics.on_association,
            on_restart=metrics.receiver_process_restarts.inc,
            on_commitment_request=metrics.on_commitment_request,
            on_commitment_report=metrics.on_commitment_report,
        )
        if processes > 1
        else None
    )
    # The forwarder frees the disk, so low disk never makes it unready.
    checks = readiness_checks(
        state.engine, state.spool, min_free_disk=settings.min_free_disk if receive else None
    )
    if pool is not None:
        checks.append(("receivers", pool.readiness_check))
        metrics.receiver_processes.set_function(lambda: float(pool.ready_processes()))
    readiness = Readiness(checks)
    receiver: Receiver | ReceiverPool | None = None
    forwarder = None
    reporter: Reporter | None = None
    http: HealthServer | None = None

    # The latest report, whoever asked for it (the monitor or a probe).
    metrics.ready.set_function(lambda: 1.0 if (r := readiness.last) and r.ready else 0.0)

    def on_readiness(report: ReadinessReport) -> None:
        if receiver is None:
            return
        # Below --min-free-disk the DICOM port closes, so senders keep their copy.
        # Database or spool trouble only makes /readyz fail: each C-STORE is then
        # answered 0xA700 with the reason, and a check that merely took too long
        # (a starved CPU) must not close the port. Nor must a slow disk check.
        disk = next((c for c in report.checks if c.name == "disk"), None)
        if disk is not None and not disk.timed_out:
            if disk.ok:
                receiver.resume()
            else:
                receiver.pause(f"disk: {disk.detail}")
        metrics.receiver_paused.set(1.0 if receiver.paused else 0.0)

    monitor = HealthMonitor(readiness, on_readiness)
    upkeep = QueueUpkeep(
        state.queue,
        state.spool,
        node_id=settings.node_id,
        retain_done=timedelta(seconds=settings.retain_done) if retention else None,
        on_retired=metrics.on_retired,
    )
    try:
        if pool is not None:
            receiver = pool
            pool.launch()  # the processes import while this one starts
        if settings.http_port:
            registry = metrics.registry if pool is None else pool.synced_registry(metrics.registry)
            http = HealthServer(
                settings.http_host,
                settings.http_port,
                readiness,
                registry,
                api_context(settings, state, routes),
            )
            http.start()
        if receive:
            safe_startup_reconcile(state, node_id=settings.node_id)
            readiness.report()  # evaluated before listening, so a pause follows at once
            if receiver is None:  # no pool: receive in this process
                from stowaway.commitment import build_storage_commitment

                commitment = build_storage_commitment(
                    settings,
                    state,
                    on_request=metrics.on_commitment_request,
                    on_report=metrics.on_commitment_report,
                )
                reporter = commitment.reporter
                receiver = build_receiver(
                    settings,
                    state,
                    on_outcome=on_store,
                    on_association=metrics.on_association,
                    services=commitment.services,
                )
            # Read from the queue, so the same wherever the requests were answered.
            metrics.watch_commitments(state.engine)
            receiver.start()
            if reporter is not None:
                reporter.start()
        monitor.check_now()
        if forward:
            from stowaway.forwarding import build_forwarder

            forwarder = build_forwarder(
                settings,
                state,
                on_upload=metrics.on_upload,
                on_destination=metrics.on_destination,
                on_failed=metrics.on_failed,
                receiving_for=activity.receiving_for,
                on_outbound=metrics.on_outbound,
            )
            forwarder.start()
        monitor.start()
        upkeep.start()
        if stop_signal.STOP.is_set():
            log.info("stop_requested_during_startup")
        stop_signal.wait()
        log.info("stop_requested")
    finally:
        readiness.set_stopping()
        monitor.stop()
        upkeep.stop()
        if receiver is not None:
            receiver.stop(settings.grace_period)
        if reporter is not None:
            reporter.stop(settings.grace_period)
        if forwarder is not None:
            forwarder.stop(settings.grace_period)
        # Last, so that liveness probes pass while work in progress drains.
        if http is not None:
            http.stop()
        state.close()
    log.info("stopped")
    return 0


def api_context(settings: Settings, state: State, routes: DestinationConfig | None) -> ApiContext:
    """What the HTTP API works on in this process (its tokens read at start-up)."""
    from stowaway.api.context import ApiContext
    from stowaway.api.tokens import AdminTokens

    tokens = AdminTokens(settings.admin_token_file) if settings.admin_token_file else None
    return ApiContext(state=state, settings=settings, routes=routes, tokens=tokens)


def build_receiver(
    settings: Settings,
    state: State,
    *,
    on_outcome: Callable[[StoreOutcome], None] = lambda _o: None,
    on_association: Callable[[str], None] = lambda _k: None,
    services: ExtraServices | None = None,
) -> Receiver:
    """The receiver, offering query/retrieve (when a store is set) and ``services``."""

    def refusal() -> str | None:
        free = shutil.disk_usage(state.spool.root).free
        if free < settings.min_free_disk:
            return "Out of disk space on the spool"
        return None

    routes = destination_config(settings)  # checked at start-up (load_settings)
    handler = StoreHandler(
        state.spool,
        state.queue,
        node_id=settings.node_id,
        is_accepting=refusal,
        on_outcome=on_outcome,
        routing=routes.routing if routes is not None else None,
    )
    config = ReceiverConfig(
        aet=settings.aet,
        aet_aliases=settings.aet_aliases,
        host=settings.host,
        port=None if settings.tls_only else settings.port,
        allowed_calling_aets=settings.allowed_calling_aets,
        max_associations=settings.max_associations,
        idle_timeout=settings.idle_timeout,
        max_pdu=settings.max_pdu,
        max_instance_size=settings.max_instance_size,
        min_free_disk=settings.min_free_disk,
        tls_port=settings.tls_port or None,
        tls_cert=settings.tls_cert,
        tls_key=settings.tls_key,
        tls_ca=settings.tls_ca,
        allowed_peers=settings.allowed_peers,
    )
    from stowaway.querying import build_query_services

    return Receiver(
        config,
        handler,
        str(state.spool.incoming_dir),
        on_association=on_association,
        services=build_query_services(settings) + (services or ExtraServices()),
    )
