"""Stage 3, scoring: the worker that scores a stable series and stores its result, the same
scoring of DICOM files without the daemon (``qcnode score``: ``files``), the verdict rules
(``summary``), and the types it hands to the stages after it (``types``)."""
