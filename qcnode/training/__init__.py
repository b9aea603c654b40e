"""Training and evaluation of the MD-IQA model (offline, not imported by the daemon)."""
