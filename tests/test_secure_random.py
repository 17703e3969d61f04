"""The generator behind every DP mechanism: a ChaCha20 stream under a 256-bit key, Gaussian to the eye of a test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from privacy import secure_random
from privacy.secure_random import SecureRandom


def test_torchs_generator_keeps_32_bits_of_a_seed_and_ours_keeps_every_bit_of_its_key() -> None:
    def torch_stream(seed: int) -> torch.Tensor:
        return torch.randn(8, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(torch_stream(5), torch_stream(5 + 2**40))  # the audit's finding: one seed in 2**32
    key = bytearray(32)
    high_bit = bytearray(32)
    high_bit[31] = 0x80
    assert not torch.equal(SecureRandom(bytes(key)).normal((8,), 1.0), SecureRandom(bytes(high_bit)).normal((8,), 1.0))
    assert torch.equal(SecureRandom(bytes(key)).normal((8,), 1.0), SecureRandom(bytes(key)).normal((8,), 1.0))
    assert not torch.equal(SecureRandom().normal((8,), 1.0), SecureRandom().normal((8,), 1.0))  # fresh OS keys
    with pytest.raises(ValueError, match="32 bytes"):
        SecureRandom(b"short")


def test_gaussian_noise_has_the_stated_distribution() -> None:
    draws = SecureRandom(bytes(range(32))).normal((200_000,), 2.5, dtype=torch.float64)
    assert stats.kstest(draws.numpy() / 2.5, "norm").pvalue > 1e-3
    assert float(draws.mean()) == pytest.approx(0.0, abs=4 * 2.5 / 200_000**0.5)
    assert float(draws.std()) == pytest.approx(2.5, rel=0.01)
    chunked = SecureRandom(bytes(range(32))).normal((3, secure_random.CPU_CHUNK + 7), 1.0)  # across chunk edges
    assert chunked.shape == (3, secure_random.CPU_CHUNK + 7) and chunked.dtype == torch.float32


def test_uniforms_are_open_and_bernoulli_batches_have_the_rate() -> None:
    rng = SecureRandom(bytes(32))
    u = rng.uniform(100_000)
    assert u.dtype == np.float64 and u.min() > 0 and u.max() < 1 and stats.kstest(u, "uniform").pvalue > 1e-3
    chosen = rng.bernoulli_indices(100_000, 0.03)
    assert abs(len(chosen) - 3000) < 4 * (100_000 * 0.03 * 0.97) ** 0.5
    assert len(set(chosen.tolist())) == len(chosen) and int(chosen.max()) < 100_000


def test_the_stream_rekeys_itself_before_the_cipher_would_wrap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secure_random, "REKEY_BYTES", 1024)
    rng = SecureRandom(bytes(32))
    first = rng.random_bytes(1000)
    second = rng.random_bytes(1000)  # past the limit: a new key, drawn from the stream itself
    assert len(first) == len(second) == 1000 and first != second
    again = SecureRandom(bytes(32))
    assert again.random_bytes(1000) == first and again.random_bytes(1000) == second  # still reproducible


def test_numpy_noise_is_the_tensors_noise_from_the_same_stream() -> None:
    """numpy's noise (the server's and the gateway's, without torch) and torch's (DP-SGD's, on any device) are one
    algorithm over one stream: equal to float64 rounding for the same key, across chunk edges."""
    key = bytes(range(32))
    shape = (2, secure_random.CPU_CHUNK + 3)
    as_numpy = SecureRandom(key).normal_numpy(shape, 1.5)
    as_tensor = SecureRandom(key).normal(shape, 1.5, dtype=torch.float64)
    assert as_numpy.dtype == np.float64 and as_numpy.shape == tuple(as_tensor.shape) == shape
    assert np.allclose(as_tensor.numpy(), as_numpy, rtol=1e-12, atol=1e-12)
    assert stats.kstest(as_numpy.ravel() / 1.5, "norm").pvalue > 1e-3
    assert SecureRandom(key).normal_numpy((0,), 1.0).shape == (0,)
    assert SecureRandom(key).normal((0, 3), 1.0).shape == (0, 3)
