"""The one domain error: what every layer below the transports raises when a request cannot be
served as sent or its generation failed. It carries all an answer needs: its status, OpenAI's error
object (`detail()`, also what SSE events and WebSocket messages carry) and the headers its status
brings (`headers`); observability.error_response turns it into HTTP for the app's handler, the
WebSocket's refused handshake and the answers written below the app (408, 431, 500)."""

from __future__ import annotations

import errno

ERROR_KINDS = {400: ("invalid_value", "invalid_request_error"), 401: ("invalid_api_key", "authentication_error"),
               403: ("forbidden", "permission_error"),
               408: ("request_timeout", "invalid_request_error"),
               404: ("not_found", "not_found_error"), 405: ("method_not_allowed", "invalid_request_error"),
               409: ("conflict", "invalid_request_error"), 413: ("request_too_large", "invalid_request_error"),
               429: ("queue_full", "rate_limit_error"),
               431: ("request_header_fields_too_large", "invalid_request_error"),
               500: ("generation_failed", "server_error"), 503: ("not_ready", "server_error"),
               504: ("timeout", "server_error"), 507: ("insufficient_storage", "server_error")}

RETRY_AFTER_FULL_S = 2  # a full queue has room again soon
RETRY_AFTER_NOT_READY_S = 5  # the models are loading
HEADERS = {401: {"WWW-Authenticate": "Bearer"}, 429: {"Retry-After": str(RETRY_AFTER_FULL_S)},
           503: {"Retry-After": str(RETRY_AFTER_NOT_READY_S)}}


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

    @property
    def headers(self) -> dict[str, str] | None:
        """The HTTP headers its status brings: 401 names the scheme, 429 and 503 say when to retry."""
        return HEADERS.get(self.status)

    def detail(self) -> dict:
        """OpenAI's error object: the `error` of a response body, an SSE event or a socket message."""
        return {"message": str(self), "type": self.error_type, "param": self.param, "code": self.code}


NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})  # a full disk, or a full quota: 507
# how writing a temporary file fails: no room, or no writable (or no) temporary directory
STORAGE_ERRNOS = NO_SPACE_ERRNOS | {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT}


def storage_failure(e: OSError, what: str, remedy: str) -> RequestError:
    """`what` (a whole file, an upload) could not be written to the server's temporary directory:
    507 when its disk is full or over quota, else (none writable: a read-only file system, say) a
    500 naming TMPDIR. `remedy` ends the message: what the client can do meanwhile."""
    if e.errno in NO_SPACE_ERRNOS:
        return RequestError(f"the server has no room for {what} now; {remedy}", status=507)
    return RequestError(f"this server cannot write {what} to a temporary directory (TMPDIR); {remedy}", status=500,
                        code="temporary_storage_not_writable")
