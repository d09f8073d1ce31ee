"""The HTTP side: probes, the versioned JSON API (``/api/v1``) and the console (``/``).

:mod:`stowaway.api.app` assembles them into one FastAPI application that
:class:`stowaway.health.HealthServer` serves with uvicorn. The API is one more
front end over :mod:`stowaway.queue_operations`, like ``stowaway queue``: it has
no SQL and no state rules of its own.
"""
