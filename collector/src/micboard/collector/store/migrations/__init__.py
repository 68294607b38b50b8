"""Alembic migrations of the collector's database, shipped inside the distribution."""
