"""HTTP server: the A1111-compatible API, the jobs API and auth; the web UI mounts here."""
