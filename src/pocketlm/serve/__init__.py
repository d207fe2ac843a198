"""The CoSteer cloud step server: sessions of token ids in, next-token scores out (`pocketlm serve`)."""

from .app import Limits, create_app
from .runner import ServerThread

__all__ = ["Limits", "ServerThread", "create_app"]
