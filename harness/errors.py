"""User-facing errors (light module: the CLI imports it without loading torch)."""


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names it and says how to fix it."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; nothing from this stage is kept."""
