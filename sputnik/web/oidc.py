"""Sign-in with an OpenID Connect provider ("Sign in with Google"): the authorization-code flow through authlib.

The login step sends the browser to the provider with a fresh state, nonce and PKCE (S256) verifier, and keeps
those three in a signed, short-lived, HttpOnly cookie scoped to /auth/oidc/. The callback refuses a state that
does not match that cookie, swaps the code (with the verifier) for tokens, and has authlib check the ID token:
signature against the provider's JWKS, issuer, audience, expiry and nonce.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import httpx
from authlib.integrations.base_client import OAuthError
from authlib.integrations.starlette_client import OAuth
from fastapi import Request, Response
from fastapi.responses import RedirectResponse
from itsdangerous import BadSignature, URLSafeTimedSerializer
from joserfc.errors import JoseError

from sputnik.web.auth import WebError

GOOGLE_ISSUER = "https://accounts.google.com"
STATE_COOKIE = "sputnik_oidc"
STATE_PATH = "/auth/oidc/"
STATE_TTL_S = 600  # a sign-in at the provider that takes longer than this starts over
STATE_SALT = "sputnik.web.oidc"


@dataclass
class OIDCProvider:
    """One OpenID Connect provider users may sign in with; `id` keys their identities, `name` is shown."""

    id: str
    name: str
    issuer: str
    client_id: str
    client_secret: str
    scopes: str = "openid email profile"
    extra_issuers: tuple[str, ...] = ()  # other spellings of `iss` the provider uses in its ID tokens

    @property
    def discovery_url(self) -> str:
        return self.issuer.rstrip("/") + "/.well-known/openid-configuration"


def providers_from_env(env: Mapping[str, str] = os.environ) -> list[OIDCProvider]:
    """Google when SPUTNIK_OIDC_GOOGLE_CLIENT_ID and _CLIENT_SECRET are set (issuer: SPUTNIK_OIDC_GOOGLE_ISSUER)."""
    client_id, secret = env.get("SPUTNIK_OIDC_GOOGLE_CLIENT_ID"), env.get("SPUTNIK_OIDC_GOOGLE_CLIENT_SECRET")
    if not client_id or not secret:
        return []
    issuer = env.get("SPUTNIK_OIDC_GOOGLE_ISSUER") or GOOGLE_ISSUER
    # Google documents both spellings of its issuer in ID tokens.
    extra = ("accounts.google.com",) if issuer == GOOGLE_ISSUER else ()
    return [OIDCProvider("google", "Google", issuer, client_id, secret, extra_issuers=extra)]


@dataclass
class OIDCLogin:
    """What a provider vouched for in a valid ID token."""

    provider: str
    sub: str
    email: str | None
    email_verified: bool
    name: str | None


def _bad_state() -> WebError:
    return WebError(400, "This sign-in link is invalid or has expired: start the sign-in again.", "invalid_state")


class OIDC:
    """The login and callback steps for a set of providers; `secret` signs the state cookie."""

    def __init__(self, providers: list[OIDCProvider], secret: Callable[[], Awaitable[str]]):
        self.providers = {p.id: p for p in providers}
        self._secret = secret
        self._signer: URLSafeTimedSerializer | None = None
        self.oauth = OAuth()
        for p in providers:
            self.oauth.register(p.id, client_id=p.client_id, client_secret=p.client_secret,
                                server_metadata_url=p.discovery_url,
                                client_kwargs={"scope": p.scopes, "code_challenge_method": "S256"})

    def provider(self, provider_id: str) -> OIDCProvider:
        if provider_id not in self.providers:
            raise WebError(404, f"No sign-in provider {provider_id!r}.", "unknown_provider")
        return self.providers[provider_id]

    async def signer(self) -> URLSafeTimedSerializer:
        if self._signer is None:
            self._signer = URLSafeTimedSerializer(await self._secret(), salt=STATE_SALT)
        return self._signer

    async def login(self, provider_id: str, request: Request, redirect_uri: str) -> RedirectResponse:
        """A redirect to the provider's authorization page, with the state cookie set."""
        self.provider(provider_id)
        client = self.oauth.create_client(provider_id)
        try:
            # authlib makes the state, the nonce (the scope has openid) and the PKCE verifier.
            rv = await client.create_authorization_url(redirect_uri)
        except (httpx.HTTPError, ValueError) as e:
            raise WebError(502, f"The sign-in provider cannot be reached: {e}", "provider_unavailable") from e
        state = {"p": provider_id, "s": rv["state"], "n": rv["nonce"], "v": rv["code_verifier"], "r": redirect_uri}
        response = RedirectResponse(rv["url"], status_code=302)
        response.set_cookie(STATE_COOKIE, (await self.signer()).dumps(state), max_age=STATE_TTL_S, path=STATE_PATH,
                            httponly=True, samesite="lax", secure=request.url.scheme == "https")
        return response

    async def finish(self, provider_id: str, request: Request) -> OIDCLogin:
        """Check the callback's state, swap its code for tokens and validate the ID token; 400 on any failure."""
        provider = self.provider(provider_id)
        query = request.query_params
        if query.get("error"):
            reason = query.get("error_description") or query["error"]
            raise WebError(400, f"The provider refused the sign-in: {reason}", "oidc_refused")
        saved = await self._saved_state(provider_id, request)
        code = query.get("code")
        if not code:
            raise WebError(400, "The provider sent no authorization code.", "oidc_failed")
        client = self.oauth.create_client(provider_id)
        try:
            token = await client.fetch_access_token(redirect_uri=saved["r"], code=code, code_verifier=saved["v"])
        except (OAuthError, httpx.HTTPError, ValueError) as e:
            raise WebError(400, f"The provider would not confirm the sign-in: {e}", "oidc_failed") from e
        issuers = [provider.issuer, provider.issuer.rstrip("/"), *provider.extra_issuers]
        options = {"iss": {"essential": True, "values": issuers},
                   "aud": {"essential": True, "values": [provider.client_id]},
                   "exp": {"essential": True},
                   "sub": {"essential": True}}
        try:
            claims = await client.parse_id_token(token, nonce=saved["n"], claims_options=options)
        except (JoseError, httpx.HTTPError, ValueError, KeyError) as e:
            raise WebError(400, f"The provider's ID token is not valid: {e}", "invalid_id_token") from e
        if claims is None:
            raise WebError(400, "The provider sent no ID token.", "invalid_id_token")
        verified = claims.get("email_verified")
        return OIDCLogin(provider=provider_id, sub=str(claims["sub"]), email=claims.get("email"),
                         email_verified=verified is True or str(verified).lower() == "true",
                         name=claims.get("name"))

    async def _saved_state(self, provider_id: str, request: Request) -> dict:
        raw, state = request.cookies.get(STATE_COOKIE), request.query_params.get("state")
        if not raw or not state:
            raise _bad_state()
        try:
            saved = (await self.signer()).loads(raw, max_age=STATE_TTL_S)
        except BadSignature as e:  # SignatureExpired is one too
            raise _bad_state() from e
        if not isinstance(saved, dict) or saved.get("p") != provider_id:
            raise _bad_state()
        if not secrets.compare_digest(str(saved.get("s", "")).encode(), state.encode()):
            raise _bad_state()
        return saved

    @staticmethod
    def clear_state(request: Request, response: Response) -> None:
        # One state, one use: the code it guarded is spent too.
        response.delete_cookie(STATE_COOKIE, path=STATE_PATH, httponly=True, samesite="lax",
                               secure=request.url.scheme == "https")
