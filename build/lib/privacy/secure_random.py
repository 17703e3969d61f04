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
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

if TYPE_CHECKING:
    import torch

KEY_BYTES = 32
REKEY_BYTES = 1 << 34  # well below ChaCha20's 2**32 blocks of 64 bytes per key and nonce
DRAWS_PER_GAUSSIAN = 4
_UNIT = 2.0**-53
_UNIT32 = 2.0**-32
CPU_CHUNK = 1 << 15  # Gaussians per chunk on a CPU


def _gaussian_sums(words: Any, size: int, xp: ModuleType) -> Any:
    """`size` Gaussians of variance DRAWS_PER_GAUSSIAN, each the sum of that many Box-Muller draws, from
    DRAWS_PER_GAUSSIAN * `size` 32-bit signed words given as float64. `xp` is numpy or torch (which name these
    operations alike): one algorithm for the CPU's numpy noise and an accelerator's tensors."""
    half = DRAWS_PER_GAUSSIAN // 2
    u = (words + (2.0**31 + 0.5)) * _UNIT32  # in the open interval (0, 1)
    radius = xp.sqrt(-2.0 * xp.log(u[: half * size]))
    angle = (2.0 * math.pi) * u[half * size:]
    return ((xp.cos(angle) * radius).reshape(half, size).sum(0)
            + (xp.sin(angle) * radius).reshape(half, size).sum(0))


class SecureRandom:
    """A cryptographic random stream. `key` is for tests that need a reproducible stream; never pass one in a run.
    Only `normal` loads torch: the gateway's and the server's mechanisms draw numpy noise without it."""

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

    def _words(self, n: int, dtype: type[np.signedinteger[Any]]) -> np.ndarray:
        return np.frombuffer(bytearray(self.random_bytes(np.dtype(dtype).itemsize * n)), dtype=dtype)

    def uniform(self, n: int) -> np.ndarray:
        """n float64 uniforms in the open interval (0, 1), 53 bits each."""
        bits = (self._words(n, np.int64) >> 11) & ((1 << 53) - 1)
        return (bits.astype(np.float64) + 0.5) * _UNIT

    def bernoulli_indices(self, n: int, p: float) -> np.ndarray:
        """Indices of n independent Bernoulli(p) trials that came up 1: one Poisson-sampled batch."""
        return np.flatnonzero(self.uniform(n) < p)

    def _gaussian_chunks(self, count: int, chunk: int, xp: ModuleType,
                         as_float64: Callable[[np.ndarray], Any]) -> list[Any]:
        """`count` Gaussians of variance DRAWS_PER_GAUSSIAN as arrays of `xp`, `chunk` at a time."""
        sizes = [min(chunk, count - start) for start in range(0, count, chunk)]
        return [_gaussian_sums(as_float64(self._words(DRAWS_PER_GAUSSIAN * size, np.int32)), size, xp)
                for size in sizes]

    def normal_numpy(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        """Gaussian noise with mean 0 and standard deviation `std`, float64, as numpy computes it (the server's and
        the gateway's mechanisms, which run without torch)."""
        parts = self._gaussian_chunks(math.prod(shape), CPU_CHUNK, np, lambda words: words.astype(np.float64))
        noise = np.concatenate(parts) if parts else np.zeros(0)
        return (noise * (std / math.sqrt(DRAWS_PER_GAUSSIAN))).reshape(shape)

    def normal(self, shape: tuple[int, ...] | torch.Size, std: float, *, dtype: torch.dtype | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
        """The same Gaussian noise as a tensor of `dtype` (float32 by default), computed in float64 on `device`
        (on a CPU in chunks that stay in its cache; torch's kernels are about twice as fast as numpy's here)."""
        import torch

        device = torch.device(device)
        count = math.prod(shape)
        chunk = CPU_CHUNK if device.type == "cpu" else max(count, 1)
        parts = self._gaussian_chunks(count, chunk, torch,
                                      lambda words: torch.from_numpy(words).to(device).double())
        noise = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)
        return (noise * (std / math.sqrt(DRAWS_PER_GAUSSIAN))).view(tuple(shape)).to(dtype or torch.float32)
