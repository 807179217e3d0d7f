"""Every SMTP reply the gateway sends, in one place.

Texts say what happened and what the sender can do; they never carry
exception text or internal details (STYLE: habit 5).
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.api import Action

__all__ = ["Reply", "verdict_reply", "xforward_syntax"]


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    status: str  # RFC 3463 enhanced status code
    text: str

    def __str__(self) -> str:
        if not self.status:
            return f"{self.code} {self.text}"
        return f"{self.code} {self.status} {self.text}"


def _clean(text: str, limit: int = 300) -> str:
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text)[:limit]


# Envelope stage (RFC 5321 §4.2, RFC 3463)
RELAY_DENIED = Reply(550, "5.7.1", "Relaying denied: recipient domain is not accepted here")
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
TOO_MANY_RECIPIENTS = Reply(
    452, "4.5.3", "Too many recipients for this message; send the rest separately"
)
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
TOO_MANY_SESSIONS = Reply(421, "4.7.0", "Too many connections; try again later")
TOO_MANY_FROM_IP = Reply(421, "4.7.0", "Too many connections from your address; try again later")
TOO_MANY_THROUGH_PROXY = Reply(
    421, "4.7.0", "Too many connections through this proxy; try again later"
)
TIMEOUT = Reply(421, "4.4.2", "Timeout waiting for input; closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down; try again later")

# Protocol replies (RFC 5321 §4.2-4.3, RFC 3463; 354 has no enhanced code)
EHLO_SYNTAX = Reply(501, "5.5.4", "Syntax: EHLO hostname")
TLS_ACTIVE = Reply(503, "5.5.1", "TLS already active")
PIPELINED_AFTER_STARTTLS = Reply(554, "5.5.1", "Error: command pipelined after STARTTLS; closing")
AUTH_NOT_SUPPORTED = Reply(502, "5.5.1", "AUTH not supported on this service")
PROXY_NOT_TRUSTED = Reply(554, "5.7.0", "PROXY not accepted from your address")
XFORWARD_NOT_TRUSTED = Reply(550, "5.7.0", "XFORWARD not accepted from your address")
MAIL_IN_PROGRESS = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
OK = Reply(250, "2.0.0", "Ok")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
RCPT_PARAMETERS = Reply(555, "5.5.4", "RCPT TO parameters not recognized or not implemented")
RECIPIENT_DUPLICATE = Reply(250, "2.1.5", "OK (duplicate recipient)")
RECIPIENT_OK = Reply(250, "2.1.5", "OK")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
DATA_SYNTAX = Reply(501, "5.5.4", "Syntax: DATA")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")

# After DATA
RELAY_UNAVAILABLE = Reply(451, "4.4.1", "Downstream mail server unavailable; try again later")
RELAY_TEMPFAIL = Reply(451, "4.3.0", "Temporary downstream failure; try again later")
QUARANTINE_FAILED = Reply(451, "4.3.0", "Message could not be stored; try again later")
NO_MEMORY = Reply(452, "4.3.1", "Insufficient system storage; try again later")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing; try again later")


def xforward_syntax(problem: str) -> Reply:
    """A malformed XFORWARD from a trusted proxy: what our parser found wrong."""
    return Reply(501, "5.5.4", _clean(problem, 200))


def queued(queue_id: str, downstream: str = "") -> Reply:
    suffix = f" ({_clean(downstream, 120)})" if downstream else ""
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}{suffix}")


def quarantined(queue_id: str) -> Reply:
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


def verdict_reply(action: Action, reason: str, queue_id: str) -> Reply:
    """The reply for a reject or tempfail verdict; the deciding reason goes to the sender."""
    why = _clean(reason) or "message refused by policy"
    if action is Action.REJECT:
        return Reply(550, "5.7.1", f"Message rejected: {why}")
    if action is Action.TEMPFAIL:
        return Reply(451, "4.7.1", f"Message deferred: {why}; try again later")
    return queued(queue_id)
