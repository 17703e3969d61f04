"""Randomness for every privacy mechanism: a ChaCha20 keystream keyed with 256 bits from the operating system.

DP noise is only as secret as the generator behind it. torch's CPU generator keeps 32 bits of its seed and numpy's
Mersenne Twister can be reconstructed from its outputs: whoever sees one noised release could search the seed and
subtract the noise exactly. ChaCha20 (RFC 7539, through OpenSSL in `cryptography`) with a fresh key per generator
cannot be predicted without the key. Sampling uniforms take 53 bits of the stream. Each Gaussian is the sum of four
Box-Muller draws of half the standard deviation, computed in float64 from 32-bit uniforms (a draw reaches 6.8
standard deviations; the sum of four covers float64 densely), as Opacus's secure mode sums draws against the
floating-point attacks of Mironov (2012) and Jin et al. (2022) (Holohan & Braghin 2021, section 5.1). What
this does not cover is said in the README ("How the privacy guarantee is kept").
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

KEY_BYTES = 32
REKEY_BYTES = 1 << 34  # well below ChaCha20's 2**32 blocks of 64 bytes per key and nonce
DRAWS_PER_GAUSSIAN = 4
_UNIT = 2.0**-53
_UNIT32 = 2.0**-32
CPU_CHUNK = 1 << 15  # Gaussians per chunk on a CPU


class SecureRandom:
    """A cryptographic random stream. `key` is for tests that need a reproducible stream; never pass one in a run."""

    def __init__(self, key: bytes | None = None) -> None:
        self._rekey(os.urandom(KEY_BYTES) if key is None else key)

    def _rekey(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"SecureRandom: a key has {KEY_BYTES} bytes, got {len(key)}")
        self._stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
        self._used = 0

    def random_bytes(self, n: int) -> bytes:
        if self._used + n + KEY_BYTES > REKEY_BYTES:
            self._rekey(self._stream.update(bytes(KEY_BYTES)))  # the next key comes from the stream itself
        self._used += n
        return self._stream.update(bytes(n))

    def _uniform(self, n: int, device: torch.device) -> torch.Tensor:
        """n float64 uniforms in the open interval (0, 1), 53 bits each."""
        words = torch.frombuffer(bytearray(self.random_bytes(8 * n)), dtype=torch.int64) if n else \
            torch.zeros(0, dtype=torch.int64)
        bits = words.to(device).bitwise_right_shift_(11).bitwise_and_((1 << 53) - 1)
        return bits.double().add_(0.5).mul_(_UNIT)

    def uniform(self, n: int) -> torch.Tensor:
        """n float64 uniforms in the open interval (0, 1)."""
        return self._uniform(n, torch.device("cpu"))

    def normal(self, shape: tuple[int, ...] | torch.Size, std: float, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> torch.Tensor:
        """Gaussian noise with mean 0 and standard deviation `std`, computed in float64 on `device`."""
        device = torch.device(device)
        count = math.prod(shape)
        out = torch.empty(count, dtype=torch.float64, device=device)
        chunk = CPU_CHUNK if device.type == "cpu" else max(count, 1)  # chunks that stay in a CPU's cache
        half = DRAWS_PER_GAUSSIAN // 2
        for start in range(0, count, chunk):
            size = min(chunk, count - start)
            words = torch.frombuffer(bytearray(self.random_bytes(4 * DRAWS_PER_GAUSSIAN * size)), dtype=torch.int32)
            u = words.to(device).double().add_(2.0**31 + 0.5).mul_(_UNIT32)  # in the open interval (0, 1)
            radius = u[: half * size].log_().mul_(-2.0).sqrt_()
            angle = u[half * size:].mul_(2.0 * math.pi)
            cosines = torch.cos(angle).mul_(radius)
            sines = angle.sin_().mul_(radius)
            torch.add(cosines.view(half, size).sum(dim=0), sines.view(half, size).sum(dim=0),
                      out=out[start:start + size])
        return out.mul_(std / math.sqrt(DRAWS_PER_GAUSSIAN)).view(tuple(shape)).to(dtype)

    def normal_numpy(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        """The same Gaussian noise as a float64 numpy array (the server's and the gateway's mechanisms)."""
        return self.normal(shape, std, dtype=torch.float64).numpy()

    def bernoulli_indices(self, n: int, p: float) -> torch.Tensor:
        """Indices of n independent Bernoulli(p) trials that came up 1: one Poisson-sampled batch."""
        return torch.nonzero(self.uniform(n) < p).flatten()
