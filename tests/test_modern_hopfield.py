"""The modern-Hopfield mask memory: packed retrieval against a plain dense PyTorch twin, capacity, errors."""

import math

import pytest
import torch

from supsup_fast import hopfield as H
from supsup_fast import ops
from supsup_fast.errors import SupsupError
from supsup_fast.modern_hopfield import ModernHopfieldMaskMemory

# float32 sums of up to d terms of magnitude <= 1: relative error of a few ulps times sqrt(d)
RTOL, ATOL = 1e-5, 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def _masks(n, d, seed):
    return torch.rand(n, d, generator=torch.Generator().manual_seed(seed)) < 0.5


class DenseTwin:
    """Ramsauer et al.'s memory written directly on a float ``{-1, +1}`` matrix ``X [T, d]``."""

    def __init__(self, masks, beta):
        self.X = masks.double() * 2 - 1
        self.beta = beta

    def similarities(self, xi):
        return self.X @ xi

    def retrieve(self, xi):
        return self.X.T @ torch.softmax(self.beta * self.X @ xi, 0)

    def energy(self, xi):
        t, d = self.X.shape
        return (-torch.logsumexp(self.beta * self.X @ xi, 0) / self.beta + 0.5 * xi @ xi
                + math.log(t) / self.beta + 0.5 * d)


BACKENDS = ["reference"] + (["cpu_ext"] if any(b.name == "cpu_ext" and b.available for b in ops.backends()) else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t,d", [(1, 1), (3, 31), (7, 77), (40, 100), (5, 2049)])
def test_retrieval_matches_the_dense_twin(backend, t, d):
    gen = torch.Generator().manual_seed(t * 1000 + d)
    masks = _masks(t, d, seed=d + t)
    beta = 4.0 / math.sqrt(d)
    mem = ModernHopfieldMaskMemory(d, beta=beta)
    mem.store(masks[: t // 2 + 1])  # a batch of masks, then one at a time
    mem.store_all(masks[t // 2 + 1:])
    twin = DenseTwin(masks, beta)
    xi = torch.randn(d, generator=gen)
    with ops.force_backend(backend):
        assert torch.equal(mem.patterns(), twin.X.float())
        torch.testing.assert_close(mem.similarities(xi).double(), twin.similarities(xi.double()), rtol=RTOL, atol=ATOL * d)
        torch.testing.assert_close(mem.retrieve(xi).double(), twin.retrieve(xi.double()), rtol=RTOL, atol=ATOL)
        p = torch.randn(t, generator=gen)  # any weights, negative ones included
        torch.testing.assert_close(mem.combine(p).double(), twin.X.T @ p.double(), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(mem.filter_gradient(xi).double(), twin.X.T @ (twin.X @ xi.double()) / d,
                                   rtol=RTOL, atol=ATOL * t)
        # energy and its gradient through the packed ops' autograd
        a = xi.clone().requires_grad_(True)
        e = mem.energy(a)
        e.backward()
        b = xi.double().clone().requires_grad_(True)
        e_twin = twin.energy(b)
        e_twin.backward()
        torch.testing.assert_close(e.double(), e_twin.detach(), rtol=RTOL, atol=ATOL * d)
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(a.grad.double(), xi.double() - twin.retrieve(xi.double()), rtol=RTOL, atol=ATOL)
    assert mem.num_stored == t and mem.nbytes() == t * 4 * ((d + 31) // 32)
    torch.testing.assert_close(mem.pattern_mean().double(), twin.X.mean(0))


def test_many_more_patterns_than_units_are_recalled_exactly_where_storkey_fails():
    d, n = 128, 1000
    masks = _masks(n, d, seed=1)
    modern = ModernHopfieldMaskMemory(d)
    modern.store(masks)
    probes = masks ^ (torch.rand(masks.shape, generator=torch.Generator().manual_seed(2)) < 0.1)
    assert int((probes != masks).sum()) > 0.08 * n * d
    assert torch.equal(modern.recall(probes[:200]), masks[:200])
    storkey = H.HopfieldMaskStore(d)
    storkey.store_all(masks[:200])  # far above its capacity d / sqrt(2 ln d) ~ 41
    assert (storkey.recall(probes[:200], mode="sync") != masks[:200]).sum(-1).float().mean() > 10


def test_recovery_through_the_modern_memory_cleans_a_noisy_objective():
    d = 512
    masks = _masks(300, d, seed=3)  # above a d = 512 Storkey network's capacity (~145)
    mem = ModernHopfieldMaskMemory(d)
    mem.store(masks)
    gen = torch.Generator().manual_seed(4)
    for t in (0, 150, 299):
        hint = H.to_pattern(masks[t] ^ (torch.rand(d, generator=gen) < 0.2))
        tr = H.recovery_trace(mem, lambda m: -((2 * m - 1) * hint).mean(), masks[t])
        assert tr["final_hamming"] == 0 and tr["steps_to_converge"] is not None, tr["hamming"]
        assert int((hint > 0).ne(masks[t]).sum()) > 0.15 * d  # the objective alone is wrong in ~20% of bits


def test_bad_inputs_are_refused():
    with pytest.raises(SupsupError, match="d must be"):
        ModernHopfieldMaskMemory(0)
    with pytest.raises(SupsupError, match="beta"):
        ModernHopfieldMaskMemory(8, beta=0.0)
    with pytest.raises(SupsupError, match="beta"):
        ModernHopfieldMaskMemory(8, beta=float("nan"))
    mem = ModernHopfieldMaskMemory(8)
    with pytest.raises(SupsupError, match="no patterns"):
        mem.retrieve(torch.zeros(8))
    with pytest.raises(SupsupError, match="shape"):
        mem.store(torch.ones(9, dtype=torch.bool))
    with pytest.raises(SupsupError, match="shape"):
        mem.store(torch.ones(2, 2, 8, dtype=torch.bool))
    with pytest.raises(SupsupError, match="only 0 and 1"):
        mem.store(torch.tensor([0, 1, 2, 0, 0, 0, 0, 0]))
    with pytest.raises(SupsupError, match="tensor"):
        mem.store([0, 1, 0, 0, 0, 0, 0, 0])
    mem.store(torch.tensor([0, 1, 1, 0, 0, 0, 0, 1]))
    assert mem.num_stored == 1
    with pytest.raises(SupsupError, match="shape"):
        mem.retrieve(torch.zeros(7))
    with pytest.raises(SupsupError, match="floating"):
        mem.similarities(torch.zeros(8, dtype=torch.int64))
    with pytest.raises(SupsupError, match="steps"):
        mem.retrieve(torch.zeros(8), steps=0)
    with pytest.raises(SupsupError, match="weights"):
        mem.combine(torch.ones(2))
