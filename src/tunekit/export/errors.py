"""The one error type of `tunekit export`: what cannot be exported, why, and what works instead."""


class ExportError(ValueError):
    """The run folder, method, format or quant cannot be exported as asked; the message says what works."""
