"""stowaway: a durable store-and-forward DICOM adapter (C-STORE in, STOW-RS out)."""

__version__ = "0.1.0"
