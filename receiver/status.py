"""C-STORE response statuses stowaway answers with (PS3.4 Annex B.2.3)."""

SUCCESS = 0x0000
#: disk full, spool unwritable, queue database unavailable: the sender should retry later
OUT_OF_RESOURCES = 0xA700
#: the dataset could not be parsed, or lacks what a storage instance must have
CANNOT_UNDERSTAND = 0xC210
#: "cannot understand": the dataset has no SOP Class UID (0008,0016) or SOP Instance UID
#: (0008,0018), so it could never be forwarded (STOW-RS needs both)
MISSING_SOP_UID = 0xC221
#: "data set does not match SOP Class": the dataset's SOP Class or SOP Instance UID
#: differs from the C-STORE's Affected SOP Class/Instance UID
DATASET_DOES_NOT_MATCH = 0xA900
#: the receiver is shutting down or refusing new work
PROCESSING_FAILURE = 0x0110

#: ErrorComment is LO: at most 64 characters
ERROR_COMMENT_MAX = 64
