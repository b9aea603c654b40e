"""The daemon: serve, status, db commands and the process that runs the stages."""
