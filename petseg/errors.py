"""The errors every petseg stage raises, each with a message that names the bad value and the fix.

:class:`ConfigError` and :class:`InputError` end a job with one readable line (see :mod:`petseg.cli`);
:class:`RejectedInput` never ends a job: it becomes a row of a rejects table or an error column.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that petseg cannot run; the message names the key, the value and the fix."""


class InputError(ValueError):
    """The input is missing, empty or unusable as a whole; the message says what to fix."""


class RejectedInput(ValueError):
    """One input (an image, a trimap, a file) that cannot be used; the job goes on without it.

    Parameters
    ----------
    reason
        A short machine-readable code, stable across releases (a column of the rejects table, and
        the start of the inference ``error`` column).
    detail
        A human-readable explanation naming the bad value.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
