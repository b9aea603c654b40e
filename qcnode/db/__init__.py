"""Database layer: ORM models (schema owned by Alembic), engine/session helpers, queue."""
