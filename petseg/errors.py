"""The errors every petseg stage raises, each with a message that names the bad value and the fix.

:class:`ConfigError` and :class:`InputError` end a job with one readable line (see :mod:`petseg.cli`);
:class:`RejectedInput` never ends a job: it becomes a row of a rejects table or an error column.
"""

from __future__ import annotations

import re


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


#: A Python traceback's header, alone on its line or after the Java exceptions that carry it
#: (``...SparkException: Job aborted ...: org.apache.spark.api.python.PythonException: Traceback ...``);
#: never indented, as a traceback quoted inside an exception's message is.
_TRACEBACK_HEADER = re.compile(r"^(?:\S.*: )?Traceback \(most recent call last\):\s*$")


def traceback_reason(text: str) -> str | None:
    """The ``Type: message`` line that ends the last Python traceback in ``text``, or None without one.

    A failure that crossed a process (a Spark task, a training worker) reaches its caller as text;
    this is the line of it that says what went wrong.
    """
    lines = text.splitlines()
    headers = [i for i, line in enumerate(lines) if _TRACEBACK_HEADER.match(line)]
    if not headers:
        return None
    for line in lines[headers[-1] + 1:]:
        if line.strip() and not line[0].isspace():
            return line.strip()
    return None
