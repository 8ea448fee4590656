"""The American spelling of :mod:`supsup_fast.binarise` (the same module)."""

import sys

from . import binarise

sys.modules[__name__] = binarise
