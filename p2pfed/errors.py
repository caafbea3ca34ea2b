"""Exceptions that p2pfed raises on purpose.

`UserError` and its subclasses are mistakes a user can fix (bad config, bad address); the CLI prints their message as
one line and exits non-zero. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["ActorDeadError", "ConfigError", "UserError"]


class UserError(Exception):
    """A mistake the user can fix; its message is one sentence shown without a traceback."""


class ConfigError(UserError):
    """A config file, profile or --set override that does not validate."""


class ActorDeadError(RuntimeError):
    """An ask() reached an actor that has stopped, or was still queued when it stopped."""
