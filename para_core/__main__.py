"""``python -m para_core``: see para_core/cli.py."""
from .cli import main

raise SystemExit(main())
