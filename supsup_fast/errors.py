"""The library's exception types: every bad input raises one of these, naming the problem."""


class SupsupError(ValueError):
    """Invalid input to a supsup_fast entry point (shape, dtype, device, task id, config)."""


class BackendError(RuntimeError):
    """No backend can run an op on the given inputs, or a forced backend declined them."""


class BankFileError(SupsupError):
    """A mask-bank file is truncated, corrupted, of another version or of another model."""


class BankDurabilityWarning(RuntimeWarning):
    """A bank change is complete and visible to readers, but flushing its directory to disk failed
    (``fsync`` returned an error): the change may not survive a power failure or an OS crash."""
