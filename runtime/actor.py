"""Actors (placeholder until the actors issue lands)."""
from __future__ import annotations


class ActorClass:
    def __init__(self, cls, options):
        self._cls = cls
        self._options = options

    def remote(self, *args, **kwargs):
        raise NotImplementedError("actors are not implemented yet")

    def options(self, **kw):
        return self
