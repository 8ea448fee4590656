"""How ``supsup-fast run`` starts and stops: SIGINT / SIGTERM become a clean interruption (the finished tasks
are already on disk, see :mod:`.run_dir`), and ``--resume DIR`` takes the saved settings of the run in DIR."""

from __future__ import annotations

import contextlib
import signal
import threading

from ..errors import SupsupError

#: flags that change how a run is shown or scheduled, not what it computes: allowed beside --resume
_RESUME_MAY_CHANGE = {"resume", "no_progress", "threads", "func", "run_parser", "command"}


@contextlib.contextmanager
def signals_as_interrupts():
    """SIGTERM raises :class:`KeyboardInterrupt` like SIGINT does, so ``kill`` ends a run as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def resume_config(args, config_cls):
    """The configuration saved in ``args.resume``; refuses other flags that would change the run."""
    from . import run_dir

    parser = args.run_parser
    changed = sorted(f"--{k.replace('_', '-')}" for k, v in vars(args).items()
                     if k not in _RESUME_MAY_CHANGE and v != parser.get_default(k))
    if changed:
        raise SupsupError(f"--resume continues a run with its saved settings; drop {' '.join(changed)} "
                          "(only --no-progress and --threads may be given with it)")
    cfg = run_dir.resume(args.resume, config_cls)
    cfg.progress = not args.no_progress
    return cfg


__all__ = ["signals_as_interrupts", "resume_config"]
