"""``python -m para_core``: see para_core/cli.py."""
import os
import signal

from .cli import TERMINATED, main

status = main()
if status == TERMINATED:
    # The temporary file is gone; now end the way a SIGTERM'd process ends (status -15 / 143).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
raise SystemExit(status)
