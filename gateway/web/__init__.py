"""The quarantine for people: REST API, admin pages, digest links and digests.

Served by ``gateway run`` when ``web.listen`` is set (``server``: one process,
see docs/web.md); ``app`` builds the aiohttp application over a ``context``
(what handlers get from the gateway) and calls each part's ``add_routes``:
``api`` (JSON routes under ``/api/v1/``), ``pages`` (server-rendered admin
pages), ``recipient`` (pages digest links open, under ``/r/``). Beside them:
``hashes`` (password and token hashes, stdlib only: the config validates
with it), ``auth`` (sessions, CSRF, login limits, bearer tokens), ``links``
(signed digest links), ``preview`` (a message made safe to show), ``digest``
(per-recipient digest mail). Importing this package imports nothing heavy.
"""
