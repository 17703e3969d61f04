"""The audit log's two keys, kept apart so that whoever checks the log cannot read it: the chain key MACs every
record (and the sealed head and the pruning anchor), the text key encrypts the request text (Fernet). Verifying,
pruning and sealing need the chain key only; reading request text needs the text key."""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass

from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MIN_CHAIN_SECRET_BYTES = 32


class AuditKeyError(ValueError):
    """An audit key is too short or malformed."""


@dataclass(frozen=True)
class AuditKeys:
    chain: bytes
    text: Fernet | None  # None: this holder may check the log but not write or read request text

    @classmethod
    def from_secrets(cls, chain_secret: str, text_key: str | None = None) -> AuditKeys:
        if len(chain_secret.encode()) < MIN_CHAIN_SECRET_BYTES:
            raise AuditKeyError(f"the chain key must hold at least {MIN_CHAIN_SECRET_BYTES} bytes "
                                "(fl-audit new-key prints one)")
        chain = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fl-audit chain").derive(
            chain_secret.encode())
        if text_key is None:
            return cls(chain, None)
        try:
            return cls(chain, Fernet(text_key.encode()))
        except (ValueError, TypeError):
            raise AuditKeyError("the text key must be a Fernet key (fl-audit new-key prints one)") from None

    def mac(self, values: list[object]) -> str:
        """HMAC-SHA256 under the chain key over the values as canonical JSON (bytes as hex)."""
        payload = json.dumps([v.hex() if isinstance(v, bytes) else v for v in values], separators=(",", ":"))
        return hmac.new(self.chain, payload.encode(), hashlib.sha256).hexdigest()
