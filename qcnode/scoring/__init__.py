"""Stage 3, scoring: the worker that scores a stable series and stores its result, and the
same scoring of DICOM files without the daemon (``qcnode score``)."""
