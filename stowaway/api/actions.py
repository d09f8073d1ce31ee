"""``POST /api/v1/actions/...``: requeue, purge, reroute, with ``stowaway queue``'s selectors.

Each needs a token (:mod:`stowaway.api.auth`), answers what it did (the CLI's
``--json`` result) and is logged in one line: who (the token's name), what, and the
counts.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request

from stowaway import queue_operations as ops
from stowaway.api import models
from stowaway.api.auth import admin
from stowaway.api.context import context_of

log = logging.getLogger("stowaway")

router = APIRouter(prefix="/actions", tags=["actions"])
Admin = Annotated[str, Depends(admin)]
_REFUSALS: dict[int | str, dict[str, Any]] = {
    401: {"model": models.Problem, "description": "no or a malformed Authorization header"},
    403: {"model": models.Problem, "description": "read-only, or a token not in the file"},
}


def api_spelling(name: str) -> str:
    """How the API names a selector in its messages: the JSON field."""
    return name


def _selection_error(exc: ops.SelectionError) -> HTTPException:
    """Selectors that make no sense together: 422, shaped like FastAPI's own."""
    return HTTPException(422, [{"loc": ["body"], "msg": str(exc), "type": "selection"}])


def _logged(who: str, action: str, request: dict[str, Any], result: dict[str, int]) -> None:
    log.info("api_action", extra={"who": who, "action": action, **request, **result})


def _count(value: Any) -> int:
    return len(value) if isinstance(value, list) else int(value)


@router.post("/requeue", response_model=models.RequeueResult, responses=_REFUSALS)
def requeue(body: models.RequeueRequest, request: Request, who: Admin) -> dict[str, Any]:
    """Back to pending, due now, attempts reset; the last error is kept in the history."""
    context = context_of(request)
    selection = ops.RequeueSelection(
        ids=tuple(body.ids),
        failed=body.failed,
        status=body.status,
        study=body.study,
        destination=body.destination,
    )
    try:
        result = ops.requeue(context.state, selection, context.settings.node_id, spell=api_spelling)
    except ops.SelectionError as exc:
        raise _selection_error(exc) from None
    out = {**result, "requeued": len(result["requeued"])}
    _logged(
        who,
        "requeue",
        body.model_dump(exclude_defaults=True, mode="json"),
        {key: _count(value) for key, value in out.items()},
    )
    return out


@router.post("/purge", response_model=models.PurgeResult, responses=_REFUSALS)
def purge(body: models.PurgeRequest, request: Request, who: Admin) -> dict[str, Any]:
    """Delete rows and their spool files (never a row in flight under a live lease)."""
    context = context_of(request)
    try:
        older_than = ops.parse_age(body.older_than) if body.older_than is not None else None
    except ValueError as exc:
        raise HTTPException(
            422, [{"loc": ["body", "older_than"], "msg": str(exc), "type": "value_error"}]
        ) from None
    selection = ops.PurgeSelection(
        ids=tuple(body.ids),
        failed=body.failed,
        done=body.done,
        older_than=older_than,
        destination=body.destination,
    )
    queue = context.state.queue
    try:
        ids, not_found = ops.purge_candidates(queue, selection, spell=api_spelling)
    except ops.SelectionError as exc:
        raise _selection_error(exc) from None
    if body.dry_run:
        out: dict[str, Any] = {
            "purged": 0,
            "bytes": queue.total_bytes(ids),
            "files_removed": 0,
            "file_errors": [],
            "skipped": [],
            "not_found": not_found,
            "would_purge": ids[: models.MAX_IDS],
        }
    else:
        out = ops.purge_json(ops.purge(context.state, ids, selection.statuses), ids, not_found)
    out["dry_run"] = body.dry_run
    _logged(
        who,
        "purge",
        body.model_dump(exclude_defaults=True, mode="json"),
        {key: _count(value) for key, value in out.items() if key != "dry_run"},
    )
    return out


@router.post(
    "/reroute",
    response_model=models.RerouteResult,
    response_model_exclude_none=True,  # a dry run's rows have no created/skipped
    responses={**_REFUSALS, 409: {"model": models.Problem, "description": "no routing here"}},
)
def reroute(body: models.RerouteRequest, request: Request, who: Admin) -> dict[str, Any]:
    """Route unrouted rows with the rules this process runs with."""
    context = context_of(request)
    if context.routes is None:
        raise HTTPException(
            409, "this process has no destinations (--dicomweb-url, --destinations, ...)"
        )
    out = ops.reroute(context.state, context.routes, body.ids, dry_run=body.dry_run)
    _logged(
        who,
        "reroute",
        body.model_dump(exclude_defaults=True, mode="json"),
        {"rows": len(out["rows"]), "not_found": len(out["not_found"])},
    )
    return out
