"""Room events on their way to the application: kept while their key is missing.

See ``queue.py`` and docs/event-lifecycle.md.
"""

from olmstead.delivery.queue import DeliverySettings, RoomEventQueue, WaitingResult

__all__ = ["DeliverySettings", "RoomEventQueue", "WaitingResult"]
