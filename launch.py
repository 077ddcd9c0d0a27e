#!/usr/bin/env python3
"""SD3.5 Studio.

    python launch.py --demo                 start the web UI on the offline tiny models
    python launch.py                        start the web UI (models load on first use)
    python launch.py generate "a red fox" --demo
    python launch.py plan --vram 8 --variant sd3.5-large
"""

import sys

from studio.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
