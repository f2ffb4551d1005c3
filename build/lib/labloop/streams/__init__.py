"""The stream layer: settings, the Faust worker, the embedded runtime and the ``labloop`` CLI."""

from labloop.streams.runtime import EmbeddedBroker, Stack, ensure_topics
from labloop.streams.settings import Settings, load_settings

__all__ = ["EmbeddedBroker", "Settings", "Stack", "ensure_topics", "load_settings"]
