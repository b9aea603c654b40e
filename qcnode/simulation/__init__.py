"""Low-dose / sparse-view CT simulation and synthetic reader labels (offline)."""
