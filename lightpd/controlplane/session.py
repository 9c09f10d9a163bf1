"""Dashboard sessions: a signed, expiring cookie granted for the admin token.

The cookie holds ``{expiry}.{hmac(admin_token, expiry)}``, never the token, so
it is checked without state: every control plane that shares the admin token
accepts it, and changing the token signs everyone out. It is HttpOnly (page
scripts cannot read it) and SameSite=Strict (other sites cannot make the
browser send it).
"""

import hashlib
import hmac
import time

COOKIE = "lightpd_session"
SESSION_S = 12 * 3600
# Requests that change something and are authorized by the cookie must carry this
# header: a plain form on another site cannot set it (a second guard against CSRF).
CSRF_HEADER = "x-lightpd-dashboard"


def _signature(admin_token: str, expiry: int) -> str:
    message = f"lightpd-dashboard-session:{expiry}".encode()
    return hmac.new(admin_token.encode(), message, hashlib.sha256).hexdigest()


def issue(admin_token: str) -> str:
    expiry = int(time.time()) + SESSION_S
    return f"{expiry}.{_signature(admin_token, expiry)}"


def is_valid(cookie: str | None, admin_token: str) -> bool:
    expiry, _, signature = (cookie or "").partition(".")
    # A cookie is any Latin-1 text: "²" passes isdigit() yet fails int(), and
    # compare_digest refuses non-ASCII str, so both compare ASCII or bytes only.
    if not (expiry.isascii() and expiry.isdigit()) or int(expiry) < time.time():
        return False
    return hmac.compare_digest(signature.encode(), _signature(admin_token, int(expiry)).encode())
