"""Alembic migrations for the queue schema (run with ``stowaway migrate``)."""
