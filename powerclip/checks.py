"""Value checks on device tensors (index ranges, empty captions) that are off in training by default.

Reading a value of a CUDA tensor on the host waits for the GPU: one such check per step costs more
than the loss it guards, and the training step is allowed one synchronisation (train/step_sync.py).
Shape checks are free (shapes live on the host) and always run; checks that read values run only
when ``train.debug_checks`` is true, so a bad batch can still be
diagnosed with a clear message by rerunning with the flag on.
"""

from __future__ import annotations

_enabled = False


def enabled() -> bool:
    """Whether value-reading checks run (``train.debug_checks``)."""
    return _enabled


def set_enabled(on: bool) -> None:
    """Set at start-up from ``train.debug_checks``."""
    global _enabled
    _enabled = bool(on)

