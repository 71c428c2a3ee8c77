"""The errors xnorcdl raises on purpose: bad input, not bugs.

Every one derives from :class:`XnorcdlError` and carries ``where``, the file, field or option it
concerns (``None`` where no single one does); its message names that and what was expected. The
command line (:func:`xnorcdl.cli.boundary`) prints such an error as one ``error:`` line and exits
with status 2; any other exception is a bug and keeps its traceback.

They subclass ``ValueError`` so that code catching ``ValueError`` around a loader keeps working.

- :class:`WeightsError`: a weights file or its description (docs/FORMAT.md);
- :class:`EnergyTableError`: an energy table (docs/COUNTING.md);
- :class:`DataError`: an image record file or a data source;
- :class:`UsageError`: an option or argument value.
"""
from __future__ import annotations

from typing import Optional


class XnorcdlError(ValueError):
    """Base of the project's expected errors; ``where`` names the file, field or option."""

    def __init__(self, message: str, where: Optional[str] = None):
        super().__init__(message)
        self.where = where


class WeightsError(XnorcdlError):
    """A weights file that cannot be used; the message names the file and the key."""


class EnergyTableError(XnorcdlError):
    """An energy table that cannot be used; the message names the file and the key."""


class DataError(XnorcdlError):
    """A data file or data source that cannot be used as asked; the message says why."""


class UsageError(XnorcdlError):
    """A bad option or argument value; the message names the option."""


class ArtifactError(XnorcdlError):
    """An edge or cloud artifact (``python -m xnorcdl split``) that cannot be used."""


class WireError(XnorcdlError):
    """A wire message (docs/PROTOCOL.md) that breaks the protocol; ``where`` names the field."""

    def __init__(self, message: str, field: str = ""):
        super().__init__(message, where=field or None)
        self.field = field


class CloudError(XnorcdlError):
    """The cloud could not be reached in time, or refused a request."""
