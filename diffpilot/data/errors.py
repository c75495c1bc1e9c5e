"""The one error type the data layer raises for bad input.

Subclassing ``ValueError`` lets callers that already catch ``ValueError``
keep working, while code that wants to tell a malformed data set apart
from a programming mistake can catch :class:`DatasetError` alone.
"""

from __future__ import annotations


class DatasetError(ValueError):
    """A data set on disk or in memory is missing, malformed or inconsistent.

    The message always names the offending file or key and says how to fix it.
    """
