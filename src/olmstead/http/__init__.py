"""The only place olmstead does HTTP: machine requests to paths, failures to typed errors."""

from olmstead.http.transport import MatrixHttp, RetryPolicy

__all__ = ["MatrixHttp", "RetryPolicy"]
