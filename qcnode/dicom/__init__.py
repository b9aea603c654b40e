"""Pure DICOM helpers (no database, no network): pixels to HU, dose fields and dose SRs, physics
(noise, water-equivalent diameter, SSDE), pseudonymisation."""
