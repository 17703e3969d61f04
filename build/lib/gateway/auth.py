"""JWT bearer tokens: HS256, signed with the deployment's secret, carrying the user and one role."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import jwt

from .config import ROLES

ALGORITHM = "HS256"
USER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")  # a user name as audit records and limits key it
CLOCK_SKEW = 60  # seconds the minting and serving hosts' clocks may differ by (exp, iat and nbf checks)


class AuthError(Exception):
    """The request is not authenticated (401) or not allowed (403); the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Principal:
    user: str
    role: str


def valid_user(user: str) -> bool:
    return USER.fullmatch(user) is not None


def mint_token(secret: str, user: str, role: str, minutes: float, issuer: str, now: float | None = None) -> str:
    if role not in ROLES:
        raise ValueError(f"role: unknown role {role!r}; choose one of {', '.join(ROLES)}")
    if not valid_user(user):
        raise ValueError("user: 1-128 letters, digits and . _ @ + -, starting with a letter or digit")
    issued = int(now if now is not None else time.time())
    claims = {"sub": user, "role": role, "iss": issuer, "iat": issued, "exp": issued + int(minutes * 60)}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_token(secret: str, token: str, issuer: str, max_minutes: float) -> Principal:
    """The token's principal, if it is signed with `secret`, current, and lives no longer than `max_minutes`: a
    token minted for years is refused, whoever signed it."""
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM], issuer=issuer, leeway=CLOCK_SKEW,
                            options={"require": ["sub", "role", "exp", "iat", "iss"]})
    except jwt.ExpiredSignatureError:
        raise AuthError(401, "token expired") from None
    except jwt.InvalidTokenError as err:
        raise AuthError(401, f"invalid token: {err}") from None
    if not all(isinstance(claims[c], int) for c in ("exp", "iat")):
        raise AuthError(401, "invalid token: exp and iat must be integers")
    if claims["exp"] - claims["iat"] > max_minutes * 60:
        raise AuthError(401, f"token lives longer than auth.token_minutes ({max_minutes:g})")
    if not isinstance(claims["sub"], str) or not valid_user(claims["sub"]):
        raise AuthError(401, "invalid token: sub is not a user name")
    if claims["role"] not in ROLES:
        raise AuthError(403, f"unknown role {claims['role']!r}")
    return Principal(claims["sub"], str(claims["role"]))


class TokenVerifier:
    """Verifies a token once and remembers the result until the token expires: the signature check is the costly
    part of a request's authentication, and a clinician's client sends the same token for up to its lifetime."""

    MAX_CACHED = 10_000

    def __init__(self, secret: str, issuer: str, max_minutes: float) -> None:
        self.secret, self.issuer, self.max_minutes = secret, issuer, max_minutes
        self._verified: dict[str, tuple[Principal, float]] = {}

    def __call__(self, token: str) -> Principal:
        cached = self._verified.get(token)
        if cached is not None and time.time() < cached[1]:
            return cached[0]
        principal = verify_token(self.secret, token, self.issuer, self.max_minutes)
        if len(self._verified) >= self.MAX_CACHED:
            self._verified.clear()
        self._verified[token] = (principal, float(jwt.decode(token, options={"verify_signature": False})["exp"]))
        return principal


def bearer_token(header: str | None) -> str:
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError(401, "missing bearer token (Authorization: Bearer <token>)")
    return token.strip()
