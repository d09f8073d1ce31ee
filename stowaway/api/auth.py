"""Who may act: ``Authorization: Bearer <token>``, a token of ``--admin-token-file``.

Reading needs no token. An action answers

* 403 when the process has no ``--admin-token-file`` (it is read-only), whatever is sent;
* 401 without an ``Authorization`` header, or with one that is not ``Bearer <token>``;
* 403 when the token is none of the file's;
* 503 when the file changed and can no longer be read (fix it: it is re-read).

Only a header is read, never a cookie, so another site's page cannot act with an
operator's browser (no CSRF), and no CORS header is ever sent.
"""

from __future__ import annotations

import logging
import re

from fastapi import HTTPException, Request, Security
from fastapi.security import HTTPBearer

from stowaway.api.context import context_of
from stowaway.api.tokens import TokenFileError

log = logging.getLogger("stowaway")

_BEARER = re.compile(r"Bearer +([\x21-\x7e]{1,4096})", re.IGNORECASE)
#: Only for the OpenAPI document: the header is checked below.
bearer_scheme = HTTPBearer(auto_error=False, description="a token of --admin-token-file")

READ_ONLY = "read-only: this stowaway runs without --admin-token-file, so the API takes no actions"


def _refusal(
    request: Request, status: int, detail: str, challenge: str | None = None
) -> HTTPException:
    """The answer to an action that may not be taken, logged (never with the token)."""
    log.warning(
        "api_action_refused",
        extra={"path": request.url.path, "status": status, "reason": detail},
    )
    headers = {"WWW-Authenticate": challenge} if challenge else None
    return HTTPException(status, detail, headers=headers)


def admin(request: Request, _scheme: object = Security(bearer_scheme)) -> str:
    """The acting token's name; refuses the request otherwise (see the module)."""
    tokens = context_of(request).tokens
    if tokens is None:
        raise _refusal(request, 403, READ_ONLY)
    header = request.headers.get("authorization")
    if header is None:
        raise _refusal(
            request, 401, "send Authorization: Bearer <token>", 'Bearer realm="stowaway"'
        )
    match = _BEARER.fullmatch(header.strip())
    if match is None:
        raise _refusal(
            request,
            401,
            "malformed Authorization header: expected Bearer <token>",
            'Bearer realm="stowaway", error="invalid_request"',
        )
    try:
        who = tokens.who(match.group(1))
    except TokenFileError as exc:
        log.error("admin_token_file_unusable", extra={"reason": str(exc)})
        raise HTTPException(503, f"--admin-token-file: {exc}") from None
    if who is None:
        raise _refusal(request, 403, "this token is not in --admin-token-file")
    return who
