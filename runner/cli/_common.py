"""What every command shares: exit codes and finding our error inside exception groups."""

from __future__ import annotations

from runner.errors import HeadlockError

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_USAGE = 2
EXIT_MIGRATED = 75
"""A migrated Actor run that no signal ended (EX_TEMPFAIL): not 0, so the platform resumes the run elsewhere."""


def headlock_error(exc: BaseException) -> HeadlockError | None:
    """The first HeadlockError in `exc`, looking inside exception groups (task groups raise those)."""
    if isinstance(exc, HeadlockError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := headlock_error(inner)) is not None:
                return found
    return None


def first_leaf(exc: BaseException) -> BaseException:
    """The first non-group exception in `exc` (task groups wrap what they raise)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
