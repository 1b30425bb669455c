"""Process-wide choices read from the environment (``NEURO_MAR_SSM_BACKEND``, ``NEURO_MAR_KERNELS``,
``NEURO_MAR_FAST_LAUNCH``, ``NEURO_MAR_CHECK_FINITE``): one check, so a mistyped value stops with the variable, the value and
the choices instead of silently meaning the default."""
from __future__ import annotations

import os


def choice(name: str, value: str, choices: tuple[str, ...], source: str = "") -> str:
    """``value`` if it is one of ``choices``; otherwise a ValueError naming ``name`` and the fix."""
    if value not in choices:
        where = f" (from {source})" if source else ""
        raise ValueError(f"unknown {name} {value!r}{where}; choose one of {choices}")
    return value


def env_choice(var: str, choices: tuple[str, ...], default: str) -> str:
    """The environment variable ``var`` checked against ``choices`` (``default`` when unset or empty)."""
    return choice(var, os.environ.get(var) or default, choices, source="the environment")


class Knob:
    """One process-wide choice: ``value`` starts from ``env_var`` (checked; ``default`` when unset)
    and changes only through :meth:`set`, which checks it the same way."""

    def __init__(self, what: str, env_var: str, choices: tuple[str, ...], default: str):
        self.what, self.choices = what, choices
        self.value = env_choice(env_var, choices, default)

    def set(self, value: str) -> None:
        self.value = choice(self.what, value, self.choices)
