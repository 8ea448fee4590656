"""``supsup_fast.experiments.experiment`` under its former name: the same module."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("supsup_fast.experiments.experiment")
