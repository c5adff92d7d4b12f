"""The client: login, the sync loop, and the driver of the machine over HTTP."""

from olmstead.client.client import Client, Session

__all__ = ["Client", "Session"]
