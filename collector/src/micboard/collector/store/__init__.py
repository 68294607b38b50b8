"""Persistence: the schema and the database engine (SQLite by default, PostgreSQL at scale)."""
