"""Stage 1, ingest: the Storage SCP, input validation, the durable spool and the recorder."""
