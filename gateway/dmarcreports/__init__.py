"""DMARC aggregate reports (RFC 9990; RFC 7489 appendix C): record, store, build, send.

- :mod:`.rows`: one report row from a message's verdict (what the report says).
- :mod:`.store`: rows counted per (interval, policy domain) on SQLite or Redis.
- :mod:`.recorder`: the hand-off's bounded, never-failing background recording.
- :mod:`.xml`: the report document; :mod:`.mail`: the report message.
- :mod:`.sender`: destinations (rua, external verification) and sending what is due.
- :mod:`.schedule`: the task in ``gateway run`` that sends at interval boundaries.
- :mod:`.cli`: ``gateway dmarc-report preview|send``.

docs/dmarc-reports.md is the operator's view.
"""
