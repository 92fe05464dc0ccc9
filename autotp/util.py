"""Small helpers shared across the package."""
from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def env_choice(name: str, choices: tuple[str, ...]) -> str:
    """The value of environment variable ``name`` (lower-cased; unset or empty means the first
    choice); anything else is an error naming the variable and the choices."""
    value = os.environ.get(name, "").strip().lower() or choices[0]
    if value not in choices:
        raise ValueError(f"autotp: {name}={value!r} is not one of {', '.join(choices)}")
    return value
