"""The one domain error: what every layer below the transports raises when a request cannot be
served as sent or its generation failed. The transports map it once: api_server.error_response for
HTTP, `RequestError.detail()` for SSE events and WebSocket messages."""

from __future__ import annotations

ERROR_KINDS = {400: ("invalid_value", "invalid_request_error"), 401: ("invalid_api_key", "authentication_error"),
               403: ("forbidden", "permission_error"),
               408: ("request_timeout", "invalid_request_error"),
               404: ("not_found", "not_found_error"), 409: ("conflict", "invalid_request_error"),
               413: ("request_too_large", "invalid_request_error"), 429: ("queue_full", "rate_limit_error"),
               500: ("generation_failed", "server_error"), 503: ("not_ready", "server_error"),
               504: ("timeout", "server_error"), 507: ("insufficient_storage", "server_error")}


class RequestError(ValueError):
    """A request cannot be served as sent, or its generation failed: an HTTP error (400 unless
    `status` says otherwise) or a WebSocket error message, naming `param`, with OpenAI's error
    `code` (by status unless given) and `error_type`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self._code = param, status, code

    @property
    def code(self) -> str:
        return self._code or ERROR_KINDS.get(self.status, ERROR_KINDS[400])[0]

    @property
    def error_type(self) -> str:
        return ERROR_KINDS.get(self.status, ERROR_KINDS[400])[1]

    def detail(self) -> dict:
        """OpenAI's error object: the `error` of a response body, an SSE event or a socket message."""
        return {"message": str(self), "type": self.error_type, "param": self.param, "code": self.code}
