"""Alerts: FAIL verdicts and audit flags, acknowledged by an admin, optionally POSTed to a webhook."""
