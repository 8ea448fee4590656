"""The extension loader (:mod:`supsup_fast.backends._ext`) under its former name: the same module."""

import sys

from .backends import _ext

sys.modules[__name__] = _ext
