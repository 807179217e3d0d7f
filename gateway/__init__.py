"""Inbound mail filtering gateway: an SMTP proxy that explains every verdict."""

__version__ = "0.1.0"
