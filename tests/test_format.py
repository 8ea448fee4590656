"""Property tests of the packed mask format: round trips, bit layout, padding, sizes."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supsup_fast import format as fmt
from supsup_fast import ops
from supsup_fast._native import EXT_LOADED

BACKENDS = ["reference"] + (["cpu_ext"] if EXT_LOADED else [])

linear_shapes = st.tuples(st.integers(1, 9), st.integers(1, 100))
conv_shapes = st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 3), st.integers(1, 3))
weight_shapes = st.one_of(linear_shapes, conv_shapes)


def _random_masks(seed, tasks, shape, kind):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand((tasks, *shape), generator=g) < torch.rand((), generator=g)
    if kind == "bool":
        return keep
    # float masks: any non-zero value (not just 1.0) marks a kept weight
    values = torch.randn((tasks, *shape), generator=g).abs() + 0.5
    values = torch.where(torch.rand((tasks, *shape), generator=g) < 0.5, values, -values)
    return torch.where(keep, values, torch.zeros(()))


def _as_u32(words):
    return words.to(torch.int64) & 0xFFFFFFFF


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=30, deadline=None)
@given(shape=weight_shapes, tasks=st.integers(1, 6), kind=st.sampled_from(["bool", "float"]),
       seed=st.integers(0, 2**31))
def test_round_trip(backend, shape, tasks, kind, seed):
    masks = _random_masks(seed, tasks, shape, kind)
    with ops.force_backend(backend):
        words = fmt.pack(masks, shape)
        n, k = fmt.gemm_shape(shape)
        assert words.dtype == torch.int32
        assert tuple(words.shape) == fmt.packed_shape(shape, tasks) == (tasks, n, math.ceil(k / 32))
        assert torch.equal(fmt.unpack(words, shape), masks != 0)
        assert torch.equal(fmt.unpack(words, shape, torch.float32), (masks != 0).float())
    assert words.numel() * 4 == fmt.packed_nbytes(shape, tasks) == tasks * n * math.ceil(k / 32) * 4


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=30, deadline=None)
@given(shape=weight_shapes, seed=st.integers(0, 2**31))
def test_padding_bits_are_zero(backend, shape, seed):
    # all-ones masks set every valid bit: exactly the bits past K must stay clear
    n, k = fmt.gemm_shape(shape)
    with ops.force_backend(backend):
        words = _as_u32(fmt.pack(torch.ones((2, *shape), dtype=torch.bool), shape))
    full, rem = divmod(k, 32)
    assert torch.all(words[..., :full] == 0xFFFFFFFF)
    if rem:
        assert torch.all(words[..., full] == (1 << rem) - 1)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None)
@given(shape=weight_shapes, data=st.data())
def test_bit_layout(backend, shape, data):
    # a single kept weight (n, k) must be bit k % 32 of word [n, k // 32], LSB first
    n, k = fmt.gemm_shape(shape)
    row = data.draw(st.integers(0, n - 1))
    col = data.draw(st.integers(0, k - 1))
    masks = torch.zeros(n, k, dtype=torch.bool)
    masks[row, col] = True
    with ops.force_backend(backend):
        words = _as_u32(fmt.pack(masks.reshape(shape), shape))
    expected = torch.zeros(n, fmt.words_per_row(k), dtype=torch.int64)
    expected[row, col // 32] = 1 << (col % 32)
    assert torch.equal(words, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_documented_words(backend):
    # bits 0 and 31 of the first word (the sign bit of int32), bit 0 of the second word
    masks = torch.zeros(2, 40, dtype=torch.bool)
    masks[0, 0] = masks[0, 31] = masks[0, 32] = True
    masks[1, 1] = masks[1, 39] = True
    with ops.force_backend(backend):
        words = fmt.pack(masks)
    assert words.tolist() == [[-(2**31) + 1, 1], [2, 1 << 7]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tasks", [1, 257, 2000])
def test_many_tasks(backend, tasks):
    shape = (3, 5, 3)
    masks = _random_masks(tasks, tasks, shape, "bool")
    with ops.force_backend(backend):
        words = fmt.pack(masks, shape)
        assert torch.equal(fmt.unpack(words, shape), masks)
    assert fmt.packed_nbytes(shape, tasks) == tasks * 3 * 1 * 4 == words.numel() * 4


def test_backends_pack_identically():
    masks = _random_masks(7, 5, (6, 70), "float")
    outs = []
    for backend in BACKENDS:
        with ops.force_backend(backend):
            outs.append(fmt.pack(masks))
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_shape_errors():
    with pytest.raises(ValueError, match="do not end in the weight shape"):
        fmt.pack(torch.ones(3, 4, 5, dtype=torch.bool), (4, 6))
    with pytest.raises(ValueError, match="do not match weight shape"):
        fmt.unpack(torch.zeros(3, 2, dtype=torch.int32), (3, 70))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        fmt.gemm_shape((5,))
