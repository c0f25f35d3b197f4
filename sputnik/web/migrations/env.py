"""Alembic's entry point for the web chat's schema.

`Database.migrate()` runs it with an open connection in `config.attributes["connection"]`; a Config from
`sputnik.web.db.alembic_config(url)` runs it on a URL instead (offline mode prints the SQL).
"""

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection

from sputnik.web.db import Base, normalize_url

config = context.config
target_metadata = Base.metadata


def run(connection: Connection) -> None:
    # SQLite cannot ALTER most things in place; batch mode copies the table instead.
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(url=normalize_url(config.get_main_option("sqlalchemy.url")), target_metadata=target_metadata,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif config.attributes.get("connection") is not None:
    run(config.attributes["connection"])
else:
    engine = create_engine(normalize_url(config.get_main_option("sqlalchemy.url")))
    try:
        with engine.begin() as connection:
            run(connection)
    finally:
        engine.dispose()
