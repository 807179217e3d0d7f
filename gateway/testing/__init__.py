"""Helpers shipped for tests and policy authors: contexts, a test DNS server, SMTP sinks."""

from gateway.testing.context import NoDNS, load_eml, make_context

__all__ = ["NoDNS", "load_eml", "make_context"]
