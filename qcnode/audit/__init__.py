"""Dose-protocol audit: statistics, flags, reports."""
