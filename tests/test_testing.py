"""The shared tolerance rule: the table for sums up to SUM_TERMS products, sqrt growth beyond."""

import torch

from supsup_fast import testing


def test_table_covers_sums_up_to_sum_terms_and_grows_with_sqrt_of_longer_sums():
    assert testing.tolerance(torch.float32, terms=100) == testing.TOLERANCE[torch.float32]
    assert testing.tolerance(torch.float32, terms=4 * testing.SUM_TERMS) == 2 * testing.TOLERANCE[torch.float32]
    assert testing.tolerance(torch.float16, terms=10**6) == testing.TOLERANCE[torch.float16]
    assert testing.tolerance(torch.float32, tf32=True, terms=10**6) == 10 * testing.TF32_TOLERANCE
