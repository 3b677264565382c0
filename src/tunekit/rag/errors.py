"""The one error class of tunekit rag: what the user asked cannot be done, and the message says how to fix it."""


class RagError(ValueError):
    """A missing collection, an unknown store URL, an embedding model that does not match the collection, ..."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status
