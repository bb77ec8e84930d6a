"""The one error the data pipeline raises for problems a user fixes in their config or files."""

from __future__ import annotations

from ..errors import RuntimeUserError


class DataError(RuntimeUserError):
    """A missing file, an unreachable dataset, a malformed row: the message is one line, shown without a
    traceback (``preprocess`` exits 2)."""
