"""Fenced pynetdicom/socketserver internals: fast receive, direct C-STORE, shared listener."""
