"""userlens: user embeddings learned without labels from interaction logs."""

import os

__version__ = "0.1.0"

# These machines (and many production networks) have no internet: never phone home.
for _name, _value in (
    ("DVC_NO_ANALYTICS", "1"),
    ("GX_ANALYTICS_ENABLED", "false"),
    ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
):
    os.environ.setdefault(_name, _value)
