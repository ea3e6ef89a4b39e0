"""SIE server: an inference engine for embedding models (scheduler + runtime) and its HTTP API."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sie")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
