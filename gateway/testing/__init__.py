"""Helpers shipped for tests and policy authors (test DNS server, contexts, sinks)."""
