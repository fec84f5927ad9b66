"""Errors the studio's handlers turn into a message for the visitor (nothing is lost)."""
from __future__ import annotations


class SettingsError(ValueError):
    """A setting the user gave is invalid; the message says which and why."""


class NotAllowed(SettingsError):
    """A setting this studio's operator has locked (a public Space); the message says why."""
