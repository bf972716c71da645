"""The error of a request the server refuses."""


class RequestError(ValueError):
    """A request the server refuses: an HTTP status (400 unless said) with an OpenAI body naming the parameter."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status
