"""The collector's HTTP face: REST API under ``/api/v1`` and ``/healthz``."""
