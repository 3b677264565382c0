"""Alembic environment of the request-log store: runs on the connection LogStore hands over (no alembic.ini)."""

from alembic import context

from tunekit.privacy.logstore import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
