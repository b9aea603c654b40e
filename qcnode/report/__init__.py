"""Stage 4, report: the DICOM SR (IHE AIR) and the Key Object Selection."""
