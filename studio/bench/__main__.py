"""``python -m studio.bench``: the CPU benchmarks (see ``studio.bench``)."""

import sys

from studio.bench import main

sys.exit(main())
