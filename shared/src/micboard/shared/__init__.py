"""micboard fleet wire contract shared by the agent and the collector."""

__version__ = "26.11.28"

#: Wire schema version carried in every envelope's ``v`` field.
SCHEMA_VERSION = 1
