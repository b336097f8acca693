"""The consumer side of Signalbox: a resumable subscriber, typed HTTP calls, a worker for bots.

Everything public is listed in ``replay.client.__all__``; see docs/clients.md for examples.
"""

from replay.client import *  # noqa: F403 - the public surface is replay.client's __all__
from replay.client import __all__ as __all__
