"""The application on top of the library: continual-learning benchmarks, the paper's architectures,
the experiment runner and the ``supsup-fast`` command.

``import supsup_fast`` does not load this package (nor its data loaders, tqdm or matplotlib);
``supsup_fast.data``, ``.models``, ``.experiment`` and ``.cli`` are these modules under their former names.
"""
