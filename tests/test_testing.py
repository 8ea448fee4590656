"""supsup_fast.testing: the shared tolerance rule (the table for sums up to SUM_TERMS products, sqrt growth
beyond) and the thread-count context manager."""

import pytest
import torch

from supsup_fast import testing


def test_table_covers_sums_up_to_sum_terms_and_grows_with_sqrt_of_longer_sums():
    assert testing.tolerance(torch.float32, terms=100) == testing.TOLERANCE[torch.float32]
    assert testing.tolerance(torch.float32, terms=4 * testing.SUM_TERMS) == 2 * testing.TOLERANCE[torch.float32]
    assert testing.tolerance(torch.float16, terms=10**6) == testing.TOLERANCE[torch.float16]
    assert testing.tolerance(torch.float32, tf32=True, terms=10**6) == 10 * testing.TF32_TOLERANCE


def test_torch_threads_sets_and_restores_the_count_even_on_an_error():
    saved = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="inside"):
        with testing.torch_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
    assert torch.get_num_threads() == saved
