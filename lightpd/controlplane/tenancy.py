"""Whose cached prefixes a request may share: its prefix cache namespace.

A prefix cache shared by strangers leaks: by counting ``cached_tokens`` (or timing
the first token) one tenant can test guesses at another's prompt, token by token.
So by default (``LIGHTPD_PREFIX_CACHE_SCOPE=tenant``) each tenant has a namespace
of its own on every node: the API key it called with, or the tenant a trusted proxy
names in ``LIGHTPD_TENANT_HEADER``. A request's ``cache_salt`` (vLLM's name)
narrows it further. With ``fleet`` scope every request shares, but for salts. The
namespace names the blocks routing looks up too, so neither routing, delta-only
transfer nor ``cached_tokens`` can show one tenant another's prefixes.
"""

import hashlib

from starlette.requests import Request

from lightpd.controlplane.deps import bearer_token
from lightpd.controlplane.settings import Settings


def cache_namespace(settings: Settings, request: Request, cache_salt: str | None) -> int:
    """The request's namespace: a signed 64-bit name; 0 (fleet-wide) when nothing
    sets one apart."""
    parts = []
    if settings.prefix_cache_scope == "tenant":
        tenant = _tenant(settings, request)
        if tenant:
            parts.append(f"tenant\0{tenant}")
    if cache_salt:
        parts.append(f"salt\0{cache_salt}")
    if not parts:
        return 0
    digest = hashlib.blake2b("\0\0".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True) or 1


def tenant_of(settings: Settings, request: Request) -> tuple[int, float]:
    """The request's tenant, as nodes share themselves among tenants (a signed 64-bit
    name; 0 for an open API's one tenant), and its weight (LIGHTPD_TENANT_WEIGHTS,
    by API key id as /admin/api-keys lists it, or by the tenant header's value)."""
    tenant = _tenant(settings, request)
    if tenant is None:
        return 0, 1.0
    digest = hashlib.blake2b(tenant.encode(), digest_size=8).digest()
    label = tenant.split("\0", 1)[1]
    if tenant.startswith("key\0"):
        label = label[:24]  # the key's id: the start of its digest
    weight = settings.tenant_weights.get(label, 1.0)
    return int.from_bytes(digest, "little", signed=True) or 1, weight


def _tenant(settings: Settings, request: Request) -> str | None:
    if settings.tenant_header:
        named = request.headers.get(settings.tenant_header)
        if named:
            return f"named\0{named}"
    token = bearer_token(request)
    if token is not None:
        # The key itself never leaves: a digest of it names the tenant.
        return "key\0" + hashlib.sha256(token.encode()).hexdigest()
    return None
