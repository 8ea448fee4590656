"""Shared by the integration tests. They need frameworks the main environment lacks (timm, torchvision,
transformers, peft, avalanche-lib). Where they are missing the tests skip, except under
``SUPSUP_FAST_INTEGRATIONS=require`` (set by CI's second environment, which installs them): there a missing
framework fails, so CI cannot pass by skipping."""

import importlib
import os
import warnings

import pytest

import supsup_fast as sf

REQUIRED = os.environ.get("SUPSUP_FAST_INTEGRATIONS", "") == "require"


def need(module: str):
    """Import ``module``, or skip (fail where the integrations are required)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if REQUIRED:
            pytest.fail(f"SUPSUP_FAST_INTEGRATIONS=require but {module} cannot be imported: {e}")
        pytest.skip(f"{module} is not installed", allow_module_level=True)


def convert(model, config=None, **kw):
    """convert_ without the dense-modules warning (tests that check it do so themselves)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sf.ConversionWarning)
        return sf.convert_(model, config, **kw)
