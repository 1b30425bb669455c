"""Zero-shot evaluation with lm-evaluation-harness 0.4 task definitions on local files.

``load_suite`` reads a suite's task files (``dev`` for development, ``general`` for the held-out
judge, or tasks named one by one), ``evaluate_suite`` scores a model on them, ``compare`` and
``render_suite_table`` put several models side by side against a reference. ``Scorer`` is the
request engine (lm-eval's tokenisation, truncation and rolling windows); ``probes`` measures SSM
head memory and attention spans.
"""
from .probes import attention_span, head_memory
from .scorer import Scorer, rolling_windows
from .suite import SUITES, batching_for, compare, describe, evaluate_suite, kept, load_suite, render_suite_table
from .tasks import TASKS, Task, TaskFileError, load_task, metrics_of, requests_of, wikitext_detokenize, wikitext_pages

__all__ = ["Scorer", "rolling_windows", "SUITES", "batching_for", "TASKS", "Task", "TaskFileError", "load_task", "load_suite",
           "evaluate_suite", "compare", "describe", "kept", "render_suite_table", "metrics_of", "requests_of",
           "wikitext_detokenize", "wikitext_pages", "head_memory", "attention_span"]
