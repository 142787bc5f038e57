"""The one SQLAlchemy database behind the registry, the prediction log and the conversation store: its
tables (`schema`) and how a process opens it (`engine`). Nothing here imports the stores above it."""

from tuneloop.db.engine import open_database
from tuneloop.db.schema import Base

__all__ = ["Base", "open_database"]
