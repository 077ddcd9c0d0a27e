"""``python -m studio.bench_gpu``: the GPU benchmark, kept at its documented name (the code is
``studio.bench.gpu``)."""

import sys

from studio.bench.gpu import main

if __name__ == "__main__":
    sys.exit(main())
