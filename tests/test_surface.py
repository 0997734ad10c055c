"""The public surface: what `import runner` offers is exactly `__all__`."""

from __future__ import annotations

import types

import runner


def test_all_is_sorted_and_matches_the_public_names() -> None:
    """`runner.__all__` is sorted and lists every public non-module name of the package, and only those."""
    public = {
        name
        for name, value in vars(runner).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert runner.__all__ == sorted(runner.__all__)
    assert set(runner.__all__) == public


def test_every_exception_derives_from_one_base() -> None:
    """Every exception runner exports is a HeadlockError."""
    errors = [
        value
        for value in map(vars(runner).get, runner.__all__)
        if isinstance(value, type) and issubclass(value, BaseException)
    ]
    assert errors
    assert all(issubclass(error, runner.HeadlockError) for error in errors)
