"""Registry: model versions indexed in the database, each a self-describing folder in the home."""

from tuneloop.db.schema import ModelVersion
from tuneloop.registry.folder import VersionFolder
from tuneloop.registry.home import Home
from tuneloop.registry.store import Registry

__all__ = ["Home", "ModelVersion", "Registry", "VersionFolder"]
