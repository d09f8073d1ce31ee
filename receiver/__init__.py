"""DIMSE side: a pynetdicom C-ECHO/C-STORE SCP that acknowledges only durable instances."""
