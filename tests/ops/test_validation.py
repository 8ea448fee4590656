"""The ops refuse bad arguments with a message naming the problem, on every backend and on both paths:
the public wrappers and ``torch.ops.supsup_fast.<op>`` itself (which reaches the backends directly)."""

from __future__ import annotations

import pytest
import torch

from supsup_fast import SupsupError, ops, testing

W = testing.randn((5, 40), torch.float32, 1)
WORDS = testing.random_bank(1, 5, 40, 2)[0]
BANK = testing.random_bank(4, 5, 40, 3)
X = testing.randn((3, 40), torch.float32, 4)

BAD = [
    ("apply_mask", (W, WORDS.to(torch.uint8)), "mask_words must be int32"),
    ("apply_mask", (W, WORDS[:, :1]), r"mask_words has shape \(5, 1\)"),
    ("superpose", (W, BANK, torch.ones(2, 4)), r"alpha has shape \(2, 4\)"),
    ("superpose", (W, WORDS, torch.ones(5)), r"bank has shape \(5, 2\), expected \[T, 5, 2\]"),
    ("mask_dots", (W, WORDS), r"bank has shape \(5, 2\)"),
    ("unpack_masks", (WORDS, -1, torch.bool), "k must be a non-negative int"),
    ("unpack_masks", (WORDS, 65, torch.bool), "cannot hold k=65 bits"),
    ("masked_linear_grouped", (X, W, BANK, torch.tensor([0, -1, 2]), None), "task id out of range"),
    ("masked_linear_grouped", (X, W, BANK, torch.tensor([0, 4, 2]), None), "task id out of range"),
    ("masked_linear_grouped_grad_input", (X[:, :5], W, BANK, torch.tensor([0, 1, 9])), "task id out of range"),
    ("masked_linear", (X, W, WORDS.to(torch.int64), None), "mask_words must be int32"),
    ("masked_linear", (X.double(), W, WORDS, None), "x dtype torch.float64 != weight dtype"),
    ("masked_linear_grad_input", (X[:, :4], W, WORDS), "last dim must be N=5"),
    ("masked_weight_grad", (X[:, :5], X[:2], W), "different numbers of rows"),
    ("masked_conv2d", (X.reshape(1, 3, 4, 10), W.reshape(5, 1, 5, 8), WORDS, None, [1, 1], [0, 0], [1, 1], 0),
     "groups must be a positive int"),
    ("masked_linear_seeded", (X, WORDS, 1, 2, float("inf"), None), "scale must be a finite number"),
    ("largest_k", (W.reshape(-1), 201, False), r"k=201 must be in \[0, 200\]"),
    ("topk_words", (W, -1), r"k=-1 must be in"),
    ("threshold_words", (W.reshape(-1),), r"needs scores of shape \[N, K\]"),
    ("signed_constant_fill_", (W.t(), 1, 2, 0.5), "out must be contiguous"),
]


@pytest.mark.parametrize("backend", [b for b, d in testing.available_backends() if d == "cpu"])
@pytest.mark.parametrize("op,args,message", BAD, ids=[f"{o}-{i}" for i, (o, _, _) in enumerate(BAD)])
def test_the_op_itself_refuses(backend, op, args, message):
    with ops.force_backend(backend), pytest.raises(SupsupError, match=message):
        getattr(torch.ops.supsup_fast, op)(*args)


@pytest.mark.parametrize("op,args,message", BAD, ids=[f"{o}-{i}" for i, (o, _, _) in enumerate(BAD)])
def test_the_public_wrapper_refuses(op, args, message):
    wrapper = getattr(ops, op)
    if op == "masked_conv2d":
        args = args[:4] + (args[4], args[5], args[6], args[7])
    with pytest.raises(SupsupError, match=message):
        wrapper(*args)
