"""``python -m simulations run ...`` is ``flower-pae run ...``."""

from simulations.cli import main

raise SystemExit(main())
