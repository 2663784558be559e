"""The errors lorakit raises. Each names the problem in terms a user can act on."""


class LorakitError(Exception):
    """Base class for every error lorakit raises on purpose."""


class ConfigError(LorakitError, ValueError):
    """A LoraConfig (or training config) field is invalid."""


class TargetError(LorakitError, ValueError):
    """A target pattern matched nothing, matched an unsupported module, or was injected twice."""


class AdapterFileError(LorakitError, ValueError):
    """An adapter file is missing, corrupt, truncated, or does not fit the model."""


class MergeError(LorakitError, RuntimeError):
    """A merge would produce non-finite weights or change the model's outputs."""


class TrainingDivergedError(LorakitError, RuntimeError):
    """Training produced a non-finite loss or gradient; the run stopped before publishing anything."""


class ExportError(LorakitError, ValueError):
    """An adapter or model cannot be written in the asked format (the message names the module and why)."""
