"""Triton kernels and their launchers (installed as ``supsup_fast.kernels``)."""
