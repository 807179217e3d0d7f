"""The memory budget for message bytes, shared by every front end (SMTP and milter).

Its own module so the milter code never imports the SMTP listener.
"""

from __future__ import annotations

__all__ = ["DataBudget"]


class DataBudget:
    """Message bytes held in memory across all sessions (``server.max_data_memory``).

    Sessions take from it chunk by chunk while DATA streams in and give it
    back after the hand-off. Nobody waits: a session that finds the budget
    spent discards the rest and answers 452, so the client retries later and
    the process never holds more than the budget in received message data.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used = max(0, self.used - n)
