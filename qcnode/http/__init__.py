"""The HTTP server of ``qcnode serve`` (its own process): health checks and DICOMweb in (STOW-RS).

``server.run_http`` is the process's entry point, ``app.create_app`` the FastAPI application,
``auth`` the bearer tokens and roles, ``login`` and ``session`` the browser's sign-in and its signed
session cookie, ``stow`` the Studies Store transaction (PS3.18 10.5).
"""
