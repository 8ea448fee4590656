"""Glue to the frameworks researchers train in; each module imports its framework only when it is imported.

* :mod:`supsup_fast.integrations.avalanche` -- a SupSup plugin (and strategy) for Avalanche's
  ``SupervisedTemplate``, and MNIST-5k written for its offline MNIST benchmarks;
* :mod:`supsup_fast.integrations.huggingface` -- a ``transformers.TrainerCallback`` that trains one task per
  ``Trainer.train()``.

``import supsup_fast`` loads neither.
"""
