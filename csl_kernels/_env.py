"""Environment reads on the per-call path. ``os.environ.get`` costs about 0.6 us (the Mapping layers and the key's
encoding); a training step's loss reads a variable in each launcher, so :class:`EnvEquals` reads the dict that
``os.environ`` keeps (and updates on every assignment, ``monkeypatch.setenv`` included) with the key encoded once."""

from __future__ import annotations

import os


class EnvEquals:
    """``EnvEquals(name, value, default)()`` is ``os.environ.get(name, default) == value``, in about 0.1 us."""

    __slots__ = ("_key", "_value", "_default_equals")

    def __init__(self, name: str, value: str, default: str | None = None) -> None:
        self._key = os.environ.encodekey(name)
        self._value = os.environ.encodevalue(value)
        self._default_equals = default == value

    def __call__(self) -> bool:
        found = os.environ._data.get(self._key)
        return self._default_equals if found is None else found == self._value


class EnvValue:
    """``EnvValue(name)()`` is ``os.environ.get(name)`` (None when unset), in about 0.1 us when unset."""

    __slots__ = ("_key",)

    def __init__(self, name: str) -> None:
        self._key = os.environ.encodekey(name)

    def __call__(self) -> str | None:
        found = os.environ._data.get(self._key)
        return None if found is None else os.environ.decodevalue(found)
