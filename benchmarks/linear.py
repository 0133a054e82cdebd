"""One Linear layer against float32 and the peers: ``mixprec bench linear`` (see
:mod:`mixprec.bench.linear`).

    .venv/bin/python benchmarks/linear.py [--features 4096] [--rounds 7] [--csv PATH]
"""

import sys

from mixprec.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "linear", *sys.argv[1:]]))
