"""Synthetic block features for the confidence tests: well-separated class Gaussians and a shift."""

from __future__ import annotations

import pytest
import torch

H, C, N = 16, 3, 2


def _gaussian_blocks(m: int, shift: torch.Tensor | float = 0.0, seed: int = 0):
    """``C`` well-separated class Gaussians in ``H`` dims; block 1 is block 0 scaled and rotated.
    Returns ``(M, N, H)`` features and ``(M,)`` classes."""
    g_means = torch.Generator().manual_seed(1)
    mu = torch.randn(C, H, generator=g_means) * 3.0  # (C, H)
    rot = torch.linalg.qr(torch.randn(H, H, generator=g_means))[0]  # (H, H)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(C, (m,), generator=g)  # (M,)
    z = mu[y] + torch.randn(m, H, generator=g) + shift  # (M, H)
    return torch.stack([z, 2.0 * z @ rot], dim=1), y  # (M, N, H), (M,)


@pytest.fixture
def gaussian_blocks():
    return _gaussian_blocks


@pytest.fixture
def ood_shift() -> torch.Tensor:
    """A shift of every feature that moves inputs out of the fitted distribution."""
    return torch.randn(H, generator=torch.Generator().manual_seed(2)) * 2.0
