"""Inbound mail filtering gateway: an SMTP proxy that explains every verdict."""

import dns._features

__version__ = "0.1.0"

# The gateway's resolvers ask over UDP and TCP only. Where the optional DoH stack
# (httpx2, h2) is installed, as the dev extras do, dnspython imports it with
# dns.query: 40 ms of every process start (the CLI, ``replay --jobs``).
dns._features.force("doh", False)
