"""The DICOMweb read side: QIDO-RS searches in pages and WADO-RS retrieval, streamed."""
