"""setok_eval: official-rule metrics, task registry, resumable eval runner, leaderboards.

Talks to models only through the adapter protocol (`setok_eval.adapters`); imports none of
the other SeTok packages.
"""

from setok_eval.adapters import ModelAdapter, ReplayAdapter, Request
from setok_eval.registry import TaskSpec, TaskValidationError, load_task, load_tasks
from setok_eval.results import read_results
from setok_eval.runner import resolve_rank, run_eval

__all__ = [
    "ModelAdapter",
    "ReplayAdapter",
    "Request",
    "TaskSpec",
    "TaskValidationError",
    "load_task",
    "load_tasks",
    "read_results",
    "resolve_rank",
    "run_eval",
]
