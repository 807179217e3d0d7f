"""The quarantine for people: REST API, admin pages, digest links and digests.

Served by ``gateway run`` when ``web.listen`` is set (``gateway/web/server.py``);
the modules: ``hashes`` (password and token hashes, stdlib only: the config
validates with it), ``auth`` (sessions, CSRF, login limits, bearer tokens),
``links`` (signed digest links), ``api`` (JSON routes under ``/api/v1/``),
``pages`` (server-rendered admin and recipient pages), ``preview`` (a message
made safe to show), ``digest`` (per-recipient digest mail). Importing this
package imports nothing heavy.
"""
