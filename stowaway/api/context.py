"""What the API's endpoints work on: the process's queue and spool, and its settings."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from stowaway.api.tokens import AdminTokens
from stowaway.destinations import DestinationConfig
from stowaway.runtime import State
from stowaway.settings import Settings


@dataclass(frozen=True)
class ApiContext:
    state: State
    settings: Settings
    #: the routing the process runs with (None: it does not route, reroute is refused)
    routes: DestinationConfig | None
    #: None: no ``--admin-token-file``, the API is read-only
    tokens: AdminTokens | None


def context_of(request: Request) -> ApiContext:
    context: ApiContext = request.app.state.context
    return context
