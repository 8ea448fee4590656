"""Shared by the integration tests. They need frameworks the library does not depend on (timm, torchvision,
transformers, peft, avalanche-lib): README's set-up installs them. Where one is missing its tests skip, or
fail under ``SUPSUP_FAST_STRICT_TESTS=1`` (``_require``)."""

import importlib
import warnings

from _require import missing

import supsup_fast as sf


def need(module: str):
    """Import ``module``, or skip (fail under strict tests) when it cannot be imported."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing(f"{module} cannot be imported ({e})")


def convert(model, config=None, **kw):
    """convert_ without the dense-modules warning (tests that check it do so themselves)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sf.ConversionWarning)
        return sf.convert_(model, config, **kw)
