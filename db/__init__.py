"""Durable state: the queue table, every SQL statement, and the spool's file layout."""
