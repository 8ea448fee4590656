"""The reference path (:mod:`supsup_fast.backends.reference`) under its short name: the same module."""

import sys

from .backends import reference

sys.modules[__name__] = reference
