"""Browser sign-in: /login takes a pasted token and keeps a signed session in a cookie; POST /logout drops it.

A browser cannot send ``Authorization: Bearer``, so on a server that needs tokens the sign-in form
checks the pasted token and stores a signed session of it (``qcnode.http.session``: the token's
name and expiry, never the token) in an HttpOnly, SameSite=Strict cookie that ``TokenAuth`` accepts
like the header. The cookie is Secure when qcnode terminates TLS, when ``http.behind_tls_proxy`` is
set, or when the request came over HTTPS. A session is only issued for a configured token, so
signing in only ever signs the caller in as themselves; the form also carries the dashboard's signed
double-submit CSRF token, so another site cannot sign a browser in under a token of its choosing.
Signing out is a POST with the same token (``csrf.Csrf.check``, as the dashboard's other forms), so
another site cannot sign a browser out either; GET /logout is 405. Sign-ins are logged by the
token's configured name, never the token.
"""
from __future__ import annotations

from html import escape
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from qcnode.config import Config
from qcnode.dashboard import csrf
from qcnode.http.auth import Tokens, caller_of
from qcnode.http.session import COOKIE
from qcnode.log import get_logger

log = get_logger("qcnode.http")

MAX_FORM_BYTES = 8192  # the sign-in form: a token and a CSRF field
LEGACY_COOKIE = "qcnode_token"  # earlier versions kept the raw token here: cleared at sign-in and sign-out
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sign in - qcnode</title><link rel="stylesheet" href="{base}/static/dashboard.css"></head>
<body><header><span class="brand">qcnode</span></header><main>
<h1>Sign in</h1>
{message}
<form method="post" action="{base}/login" id="login-form">
<input type="hidden" name="{field}" value="{csrf}">
<label>Access token <input type="password" name="token" id="token" autocomplete="current-password" required
 size="48"></label>
<button type="submit" id="sign-in">Sign in</button>
</form>
<p>Ask the node's administrator for a token with the <code>read</code> or <code>admin</code> role
(<code>[[http.tokens]]</code> in config.toml).</p>
</main></body></html>
"""


def _base(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/")


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None


def build_login_router(cfg: Config, tokens: Tokens) -> APIRouter:
    """GET/POST /login and POST /logout for ``tokens`` (those of ``cfg.http``; CSRF key of the dashboard)."""
    protector = csrf.Csrf(csrf.load_or_create_key(cfg.path(cfg.dashboard.secret_key_file)))
    router = APIRouter(include_in_schema=False)

    def secure(request: Request) -> bool:
        """Whether this request's cookies get ``Secure`` (``csrf.secure_cookies``)."""
        return csrf.secure_cookies(cfg.http, request.url.scheme)

    def forget(resp: Response, request: Request, name: str) -> None:
        """Tell the browser to forget the cookie ``name``."""
        resp.delete_cookie(name, path=_base(request) or "/", secure=secure(request), httponly=True, samesite="strict")

    def form(request: Request, message: str = "", status: int = 200) -> HTMLResponse:
        """The sign-in form; sets the CSRF cookie when the browser has no valid one yet."""
        token = request.cookies.get(csrf.COOKIE)
        fresh = not protector.valid(token)
        if fresh:
            token = protector.new_token()
        html = PAGE.format(base=escape(_base(request)), field=csrf.FIELD, csrf=escape(token or ""),
                           message=f'<p class="flash" id="login-error">{escape(message)}</p>' if message else "")
        resp = HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})
        if fresh:
            resp.set_cookie(csrf.COOKIE, token or "", httponly=True, samesite="strict", path=_base(request) or "/",
                            secure=secure(request))
        return resp

    @router.get("/login", response_class=HTMLResponse)
    def login_page(request: Request) -> Response:
        if not tokens.required:  # an open (loopback, tokenless) server: nothing to sign in to
            return RedirectResponse(f"{_base(request)}/", status_code=303)
        return form(request)

    @router.post("/login")
    async def login(request: Request) -> Response:
        if not tokens.required:
            return RedirectResponse(f"{_base(request)}/", status_code=303)
        data = await _small_form(request)
        if data is None:
            return form(request, "Sign in with the form on this page.", status=400)
        submitted, token = data.get(csrf.FIELD), data.get("token")
        if not protector.matches(request.cookies.get(csrf.COOKIE), submitted if isinstance(submitted, str) else None):
            log.warning("sign_in_csrf_refused", client=_client(request))
            return form(request, "The form expired: please sign in again.", status=403)
        caller = tokens.identify(token if isinstance(token, str) else None)
        if caller is None:
            log.warning("sign_in_refused", client=_client(request))
            return form(request, "Unknown token.", status=401)
        log.info("signed_in", token=caller.name, role=caller.role, client=_client(request))
        resp = RedirectResponse(f"{_base(request)}/", status_code=303)
        resp.set_cookie(COOKIE, tokens.new_session(caller), httponly=True, samesite="strict", secure=secure(request),
                        path=_base(request) or "/")
        if request.cookies.get(LEGACY_COOKIE):
            forget(resp, request, LEGACY_COOKIE)
        return resp

    @router.post("/logout", dependencies=[Depends(protector.check)])
    def logout(request: Request) -> Response:
        caller = caller_of(request.scope)
        if request.cookies.get(COOKIE):
            log.info("signed_out", token=caller.name, client=_client(request))
        resp = RedirectResponse(f"{_base(request)}/login", status_code=303)
        forget(resp, request, COOKIE)
        if request.cookies.get(LEGACY_COOKIE):
            forget(resp, request, LEGACY_COOKIE)
        return resp

    return router


async def _small_form(request: Request) -> dict[str, str] | None:
    """The sign-in form's fields; None unless it is a small urlencoded body (the form is open to
    anyone, so nothing large is read or parsed before the token is checked)."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/x-www-form-urlencoded":
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    try:
        fields = parse_qs(body.decode("latin-1"), max_num_fields=8)
    except ValueError:  # more fields than the form has
        return None
    return {key: values[0] for key, values in fields.items()}
