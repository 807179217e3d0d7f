"""The web app's URL prefixes, one owner each (docs/web.md "URL space")."""

API_PREFIX = "/api/v1/"  # gateway/web/api.py: JSON, admin session or bearer token
RECIPIENT_PREFIX = "/r/"  # gateway/web/recipient.py: digest links, no login
STATIC_PREFIX = "/static/"  # the UI's CSS, shipped in the package
