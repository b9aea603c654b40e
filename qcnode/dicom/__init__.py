"""DICOM stages: pixels (decode/HU/classify), scp, spool, series tracking, sr, scu."""
