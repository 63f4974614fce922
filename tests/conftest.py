"""Shared pytest setup.

tests/ has no ``__init__.py``: with pytest's default "prepend" import mode this conftest puts
tests/ on ``sys.path``, so test modules anywhere below import the test helpers as top-level
modules (``from fakes.backend import FakeBackend``, ``from upstream import FakeUpstream``).
Keep this file generic; fixtures that only one area needs live beside its tests.
"""


def pytest_addoption(parser):  # type: ignore[no-untyped-def]
    """``--long``: the long forms of the reliability suites (tests/reliability)."""
    parser.addoption(
        "--long",
        action="store_true",
        default=False,
        help="run the long forms of the reliability suites (more requests, more fuzz cases)",
    )
