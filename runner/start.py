"""Start requests, as the settings give them (URLs, or the platform's request-list form), made into drafts."""

from __future__ import annotations

from collections.abc import Sequence

from runner.context import make_draft
from runner.models import RequestDraft
from runner.settings import StartRequest
from runner.uniquekey import UniqueKeyFunction, normalize_parts

__all__ = ["start_drafts"]


def start_drafts(
    starts: Sequence[str | StartRequest], *, key_function: UniqueKeyFunction = normalize_parts
) -> list[RequestDraft]:
    """One draft per start request; a table's `uniqueKey` is kept, else `key_function` of the URL is used.

    Raises:
        InvalidUrlError: a URL that is not absolute http(s) (the message says which start request).
    """
    drafts = []
    for start in starts:
        if isinstance(start, str):
            drafts.append(make_draft(start, key_function=key_function))
            continue
        draft = make_draft(
            start.url,
            label=start.label,
            user_data=start.user_data,
            unique_key=start.unique_key,
            key_function=key_function,
        )
        drafts.append(
            draft.model_copy(update={"method": start.method, "headers": start.headers, "payload": start.payload})
        )
    return drafts
