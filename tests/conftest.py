"""Shared pytest setup.

tests/ has no ``__init__.py``: with pytest's default "prepend" import mode this conftest puts
tests/ on ``sys.path``, so test modules anywhere below import the test helpers as top-level
modules (``from fakes.backend import FakeBackend``, ``from upstream import FakeUpstream``).
Keep this file generic; fixtures that only one area needs live beside its tests.
"""
