"""Evaluation: zero-shot, retrieval and compositional benchmarks, in clip_benchmark's result schema.

The names below are loaded on first use: they import torch and open_clip, and ``powerclip eval
--help`` (which reads the task list of ``powerclip.eval.api``, so imports this package) must not.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TASKS", "EvalOptions", "evaluate", "flatten"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from powerclip.eval import api

        return getattr(api, name)
    raise AttributeError(f"module 'powerclip.eval' has no attribute {name!r}")
