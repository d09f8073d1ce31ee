"""Forwarder: uploads spooled DICOM instances to a DICOMweb (STOW-RS) destination."""
