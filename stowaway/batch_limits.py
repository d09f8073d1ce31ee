"""How much one STOW-RS request carries by default: one rule for the settings, the
destinations file and the forwarder.

50 instances: each request costs the destination its service time (the Healthcare
API takes 100-300 ms per request), so small instances go many to a request. 8 MiB:
a CT study of 500 KB instances still goes as several requests at once (about 16
instances each), since a destination stores a request's instances one after the
other and a single large request leaves a fast link idle; an instance larger than
that goes alone. See docs/performance.md ("Forwarding over an uplink").
"""

from typing import Final

BATCH_MAX_INSTANCES: Final = 50
BATCH_MAX_BYTES: Final = 8 * 1024 * 1024
