"""Built-in policies; each imports only gateway.api and registers via entry points."""
