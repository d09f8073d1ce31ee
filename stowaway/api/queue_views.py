"""``GET /api/v1/...``: what is queued and why, per destination (no token needed)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request

from stowaway import __version__
from stowaway import queue_operations as ops
from stowaway.api import models
from stowaway.api.context import ApiContext, context_of
from stowaway.db.models import DestinationState, Status
from stowaway.destination_fixes import blocked_fix

router = APIRouter(tags=["queue"])

#: Rows one page may hold.
MAX_PAGE = 500
DEFAULT_PAGE = 100
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": models.Problem}}


def _selector_error(field: str, exc: ValueError) -> HTTPException:
    """A selector's value that does not parse: 422, shaped like FastAPI's own."""
    return HTTPException(422, [{"loc": ["query", field], "msg": str(exc), "type": "value_error"}])


def summary(context: ApiContext) -> dict[str, Any]:
    """``queue stats --json``, each blocked destination with the fix ``check`` would print."""
    out = ops.queue_summary(context.state.queue, context.settings.dicomweb_url)
    for destination in out["destinations"]:
        blocked = destination["state"] == DestinationState.BLOCKED.value
        destination["fix"] = (
            blocked_fix(destination["reason"], calling_aet=context.settings.aet)
            if blocked
            else None
        )
    return out


@router.get("/server", response_model=models.ServerInfo)
def server_info(request: Request) -> dict[str, Any]:
    """This stowaway: version, and whether actions can be taken (with a token)."""
    context = context_of(request)
    return {
        "version": __version__,
        "actions_enabled": context.tokens is not None,
        "node_id": context.settings.node_id,
    }


@router.get("/summary", response_model=models.Summary)
def queue_summary(request: Request) -> dict[str, Any]:
    """Counts and bytes per status, oldest pending, bytes waiting, each destination's
    state (blocked: with the reason and the fix), the last hour."""
    return summary(context_of(request))


@router.get("/destinations", response_model=list[models.Destination])
def destinations(request: Request) -> list[dict[str, Any]]:
    """Each destination: waiting and failed deliveries, ok or blocked, reason and fix."""
    found: list[dict[str, Any]] = summary(context_of(request))["destinations"]
    return found


@router.get("/destinations/{name}", response_model=models.Destination, responses=_NOT_FOUND)
def destination(
    request: Request, name: Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]
) -> dict[str, Any]:
    for found in summary(context_of(request))["destinations"]:
        if found["name"] == name:
            return dict(found)
    raise HTTPException(404, f"no destination named {name}")


@router.get("/instances", response_model=models.InstancePage)
def instances(
    request: Request,
    status: Status | None = None,
    destination: Annotated[
        models.DestinationName | None, Query(description="only this destination's rows")
    ] = None,
    study: Annotated[models.Uid | None, Query(description="only this Study Instance UID")] = None,
    sop: Annotated[models.Uid | None, Query(description="only this SOP Instance UID")] = None,
    since: Annotated[
        models.When | None,
        Query(description="received at or after: ISO date/time (UTC without an offset) or 2h"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
    cursor: Annotated[
        str | None, Query(pattern=r"^[0-9]{1,18}$", description="next_cursor of the last page")
    ] = None,
) -> dict[str, Any]:
    """Queue rows (deliveries) oldest first, filtered like ``stowaway queue ls``, in pages."""
    try:
        received_since = ops.parse_since(since) if since is not None else None
    except ValueError as exc:
        raise _selector_error("since", exc) from None
    selection = ops.ListSelection(
        status=status, destination=destination, study=study, sop=sop, since=received_since
    )
    queue = context_of(request).state.queue
    rows = ops.list_rows(queue, selection, limit + 1, after_id=int(cursor or 0))
    page = rows[:limit]
    return {
        "items": [row.to_json() for row in page],
        "next_cursor": str(page[-1].id) if len(rows) > limit else None,
    }


@router.get("/instances/{row_id}", response_model=models.InstanceDetails, responses=_NOT_FOUND)
def instance(request: Request, row_id: Annotated[int, Path(ge=1, le=2**63 - 1)]) -> dict[str, Any]:
    """One row with its history and the state of its spool file (``queue show ID``)."""
    state = context_of(request).state
    row = state.queue.get(row_id)
    if row is None:
        raise HTTPException(404, f"no queue row with id {row_id}")
    return ops.instance_details(state.queue, state.spool, row)
