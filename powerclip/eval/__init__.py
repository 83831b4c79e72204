"""Evaluation: zero-shot, retrieval and compositional benchmarks, in clip_benchmark's result schema."""

from powerclip.eval.api import TASKS, EvalOptions, evaluate, flatten

__all__ = ["TASKS", "EvalOptions", "evaluate", "flatten"]
