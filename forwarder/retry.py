"""When an upload is tried again: the backoff policy, shared with the commitment reports
(:mod:`stowaway.backoff` holds it, so the receiver can use it without importing the
forwarder)."""

from __future__ import annotations

from stowaway.backoff import MAX_DOUBLINGS, RetryPolicy

__all__ = ["MAX_DOUBLINGS", "RetryPolicy"]
