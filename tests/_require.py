"""Skip-or-fail for what a full install provides (README's set-up line installs all of it).

A plain ``pytest`` skips a test whose piece is missing (the compiled extension, a CPU build, an
integration framework, a lint tool, the console scripts), saying which. ``SUPSUP_FAST_STRICT_TESTS=1``
(README's test line sets it) turns each of those skips into a failure, so a run cannot pass by skipping
what the install should have provided. What no install can provide here (a GPU, nvcc) still skips."""

import os

import pytest

STRICT = os.environ.get("SUPSUP_FAST_STRICT_TESTS", "") not in ("", "0")


def missing(what: str) -> None:
    """Skip because ``what`` (a sentence naming the missing piece) — or fail under strict tests."""
    if STRICT:
        pytest.fail(f"SUPSUP_FAST_STRICT_TESTS is set but {what}")
    pytest.skip(what, allow_module_level=True)
