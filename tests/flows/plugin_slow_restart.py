"""A plugin that makes a restarted worker slow to come back (test_pool): on import it
registers a family, then sleeps while the marker named in ``SLOW_RESTART`` exists (a worker
that died leaves it), so the unit runner's other workers must not wait for the restart."""

import json
import os
import tempfile
import time
from pathlib import Path

from ops.models import arch_spec, register_arch

SLOW_RESTART = Path(tempfile.gettempdir()) / "neuronmap-test-slow-restart.json"

register_arch("slow_restart_test", arch_spec("llama"))
if SLOW_RESTART.exists():
    spec = json.loads(SLOW_RESTART.read_text())
    if os.path.exists(spec["marker"]):
        time.sleep(spec["seconds"])
