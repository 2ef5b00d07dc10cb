"""A test seam for the fault suite (tests/test_faults.py): hold a process at a named point.

With USERLENS_FAULT_AT=<point>, the first `fault_point(<point>)` the process reaches writes its
pid to the file $USERLENS_FAULT_MARKER and waits there until that file is removed. The test
meanwhile SIGKILLs the process at exactly that point, or runs something beside it, then
removes the file to let it go on. Only for the points whose work between two files a test
could see takes milliseconds (a kill could not be timed from outside):

    export            embeddings.export_embeddings: the first row group is in the temporary file
    publish.chunk     feature_store._write_slot: the first chunk is in the standby slot
    publish.cut_over  feature_store.publish_set: the stable feature service moved, the pointer not yet
    refresh.written   feature_store.refresh_set: the changed rows are in the slot Parquet, not yet online
    registry.register registry.Registry.register: the staging folder holds the encoder only
    registry.alias    registry.Registry.set_production: the new alias is written, not yet renamed

Unset (always, outside tests), `fault_point` is one environment lookup.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

FAULT_AT = "USERLENS_FAULT_AT"
FAULT_MARKER = "USERLENS_FAULT_MARKER"
_reached: set[str] = set()


def fault_point(name: str) -> None:
    if os.environ.get(FAULT_AT) != name or name in _reached:
        return
    _reached.add(name)
    marker = Path(os.environ[FAULT_MARKER])
    marker.write_text(f"{os.getpid()}\n")
    while marker.exists():
        time.sleep(0.02)
