"""Exceptions raised at mixprec's public boundary.

Every error says what was wrong and what would be right. All derive from
:class:`MixprecError`, itself a :class:`ValueError`, so callers may catch broadly.
"""


class MixprecError(ValueError):
    """Base class of every error mixprec raises on bad input."""


class PolicyError(MixprecError):
    """A precision policy is malformed or does not fit the model it is applied to."""


class CalibrationError(MixprecError):
    """Calibration data is missing, empty or holds non-finite values."""


class DataError(MixprecError):
    """A dataset file is missing, malformed, truncated or fails its checksum."""


class CheckpointError(MixprecError):
    """A saved mixprec checkpoint does not fit the model it is loaded into."""


class InputError(MixprecError):
    """A tensor passed to a quantized module has the wrong dtype, shape, values or device."""


class ExportError(MixprecError):
    """A model, layer or option cannot be written in the requested export format."""
