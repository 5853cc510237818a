"""``gradguard_fl``: the earlier name of ``gradguard.fl`` (the Flower app and its tests import it),
kept as an alias of the same module."""

from gradguard.fl import *  # noqa: F401,F403
from gradguard.fl import __all__, __version__  # noqa: F401
