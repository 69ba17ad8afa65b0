"""Truncated SVD against Eckart–Young and hand-built spectra; thread use under load."""

import os

import pytest
import tiny
import torch

from lorakit import LoraError
from lorakit.lowrank import factored_svd, low_rank, rank_for_energy, spare_threads, torch_threads


def _with_singular_values(s, rows, cols, seed=0):
    """A (rows, cols) matrix whose singular values are exactly ``s``."""
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(rows, len(s), generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(cols, len(s), generator=gen, dtype=torch.float64))[0]
    return U @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ V.T


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
def test_full_rank_reconstructs_exactly(shape):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    B, A, info = low_rank(W, rank=8)
    assert B.shape == (shape[0], 8) and A.shape == (8, shape[1])
    torch.testing.assert_close(B @ A, W, atol=1e-5, rtol=0)
    assert info["rank"] == 8 and info["rel_error"] < 1e-6 and info["energy"] == pytest.approx(1.0)


def test_rank_r_error_is_the_singular_value_tail():
    s = [5.0, 3.0, 2.0, 1.0, 0.5, 0.25]
    W = _with_singular_values(s, 10, 7)
    for r in range(1, 6):
        B, A, info = low_rank(W, rank=r)
        measured = float((W - B @ A).norm() / W.norm())
        assert measured == pytest.approx(tiny.spectrum_tail(s, r), rel=1e-9)
        assert info["rel_error"] == pytest.approx(tiny.spectrum_tail(s, r), rel=1e-9)
        assert info["energy"] == pytest.approx(sum(x * x for x in s[:r]) / sum(x * x for x in s))
        # Balanced split: B = U sqrt(S), A = sqrt(S) Vᵀ, so Bᵀ B = A Aᵀ = diag(S_r).
        torch.testing.assert_close(B.T @ B, A @ A.T)
        torch.testing.assert_close(torch.diag(B.T @ B), torch.tensor(s[:r], dtype=torch.float64))


@pytest.mark.parametrize(
    ("energy", "rank"),
    # Σσ² = 16 + 4 + 1 + 0.25 = 21.25; kept shares 0.753, 0.941, 0.988, 1.
    [(0.5, 1), (0.75, 1), (0.76, 2), (0.94, 2), (0.95, 3), (0.988, 3), (0.99, 4), (1.0, 4)],
)
def test_energy_picks_the_smallest_sufficient_rank(energy, rank):
    W = _with_singular_values([4.0, 2.0, 1.0, 0.5], 9, 6).float()
    assert low_rank(W, energy=energy)[2]["rank"] == rank


def test_energy_one_finds_the_numerical_rank():
    W = _with_singular_values([3.0, 2.0, 1.0], 8, 6).float()  # rank 3 stored in fp32
    B, _, info = low_rank(W, energy=1.0)
    assert info["rank"] == 3 and B.shape == (8, 3)
    assert rank_for_energy(torch.zeros(4), 0.9) == 1  # a zero matrix still gets a factor


def test_randomized_svd_states_its_measured_error():
    gen = torch.Generator().manual_seed(2)
    W = torch.randn(300, 20, generator=gen) @ torch.randn(20, 200, generator=gen)
    W += 1e-2 * torch.randn(300, 200, generator=gen)
    B, A, info = low_rank(W, rank=20, randomized=True)
    exact = low_rank(W, rank=20, randomized=False)[2]
    assert info["method"] == "randomized_svd" and exact["method"] == "svd"
    assert info["rel_error"] == pytest.approx(float((W - B @ A).norm() / W.norm()), rel=1e-4)
    # Eckart–Young bounds it from below (up to fp32 rounding); 4 power iterations get close.
    assert 0.9999 * exact["rel_error"] <= info["rel_error"] <= 1.01 * exact["rel_error"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "positive integer"),
        ({"rank": 9}, "exceeds min(out, in) = 8"),
        ({"energy": 0.0}, "(0, 1]"),
        ({"energy": 1.5}, "(0, 1]"),
        ({"rank": 2, "energy": 0.5}, "exactly one"),
        ({}, "exactly one"),
    ],
)
def test_bad_rank_or_energy_raises(kwargs, message):
    with pytest.raises(LoraError, match=re_escape(message)):
        low_rank(torch.randn(12, 8), **kwargs)


def re_escape(text):
    import re

    return re.escape(text)


def test_non_matrix_input_raises():
    with pytest.raises(LoraError, match="2D"):
        low_rank(torch.randn(2, 3, 4), rank=1)
    with pytest.raises(LoraError, match="NaN"):
        low_rank(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), rank=1)


@pytest.mark.parametrize(
    ("b_shape", "a_shape"),
    [((40, 4), (4, 30)), ((3, 20, 6), (3, 6, 12)), ((5, 9), (9, 7))],
    ids=["low-rank", "batched", "k-above-m"],
)
def test_factored_svd_is_the_svd_of_the_product(b_shape, a_shape):
    gen = torch.Generator().manual_seed(0)
    B, A = torch.randn(b_shape, generator=gen), torch.randn(a_shape, generator=gen)
    U, S, Vh = factored_svd(B, A)
    M = B @ A
    j = min(M.shape[-2], M.shape[-1], B.shape[-1])
    assert S.shape[-1] == j
    torch.testing.assert_close(S, torch.linalg.svdvals(M)[..., :j], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(U * S.unsqueeze(-2) @ Vh, M, rtol=1e-4, atol=1e-4)
    eye = torch.eye(j).expand(*S.shape[:-1], j, j)
    torch.testing.assert_close(U.mT @ U, eye, rtol=0, atol=1e-4)  # orthonormal columns
    torch.testing.assert_close(Vh @ Vh.mT, eye, rtol=0, atol=1e-4)


def test_svd_threads_leave_busy_cores_alone_and_come_back(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    before = torch.get_num_threads()
    with torch_threads(8):
        monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))  # only this process
        assert spare_threads() == 8
        monkeypatch.setattr(os, "getloadavg", lambda: (4.5, 1.0, 1.0))  # 3.5 cores' worth busy
        assert spare_threads() == 4
        monkeypatch.setattr(os, "getloadavg", lambda: (30.0, 1.0, 1.0))
        assert spare_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "8")  # the user's choice stands
        assert spare_threads() == 8
        with torch_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 8
    assert torch.get_num_threads() == before
