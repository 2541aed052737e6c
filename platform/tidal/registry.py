"""A tiny registry: a dict plus a decorator that refuses duplicate names."""
from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T", bound=Callable)


class Registry(dict):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[T], T]:
        def deco(fn: T) -> T:
            if name in self:
                raise KeyError(f"{self.kind} '{name}' is already registered")
            self[name] = fn
            return fn

        return deco

    def get_or_raise(self, name: str) -> Callable:
        if name not in self:
            raise KeyError(f"unknown {self.kind} '{name}'; allowed: {', '.join(sorted(self))}")
        return self[name]
