"""Suite-wide settings: property tests draw the same examples on every run (CI must be deterministic).

``HYPOTHESIS_PROFILE=explore pytest ...`` draws fresh random examples instead, to hunt for new failures.
"""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
