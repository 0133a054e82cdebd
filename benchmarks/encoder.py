"""The BERT-shaped encoder against float32 and the peers, speed and memory:
``mixprec bench encoder`` (see :mod:`mixprec.bench.encoder`).

    .venv/bin/python benchmarks/encoder.py [--rounds 7] [--no-memory] [--csv PATH]
"""

import sys

from mixprec.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "encoder", *sys.argv[1:]]))
