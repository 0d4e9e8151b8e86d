"""Classes registered under a name, so configs can name them (stages by ``id``, pruners by ``name``)."""
from __future__ import annotations

from .errors import ConfigError


class Registry:
    def __init__(self, what: str, key: str):
        self.what = what    # "stage", "pruner": for messages
        self.key = key      # the class attribute that names a class
        self._classes: dict[str, type] = {}

    def register(self, cls):
        """Class decorator."""
        name = getattr(cls, self.key)
        if name in self._classes:
            raise RuntimeError(f"{self.what} {name!r} registered twice")
        self._classes[name] = cls
        return cls

    def get(self, name: str) -> type:
        cls = self._classes.get(name)
        if cls is None:
            raise ConfigError(f"unknown {self.what} {name!r} (known: {self.names()})")
        return cls

    def names(self) -> list[str]:
        return sorted(self._classes)
