"""Build mixprec's API reference (HTML, from the docstrings, with pdoc) into a folder.

    .venv/bin/python tools/api_reference.py [--out site]      (or: make docs)

The pages are written to a temporary folder beside ``--out`` and renamed into place, so a
failed build leaves the previous reference as it was. The test suite builds it too
(``tests/test_api_reference.py``), so a docstring or import that breaks it fails CI.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

#: The modules a library user calls, in the order of the reference's index (``mixprec``'s own
#: page covers ``mixprec.quantize`` and ``mixprec.export`` too: their names are in its ``__all__``).
MODULES = (
    "mixprec",
    "mixprec.policy",
    "mixprec.precision",
    "mixprec.qat",
    "mixprec.errors",
    "mixprec.observers",
    "mixprec.formats",
    "mixprec.nn",
    "mixprec.kv",
    "mixprec.analysis",
    "mixprec.integer",
)


def build(out: Path) -> list[Path]:
    """Write the reference to ``out`` (replacing what was there); returns its HTML pages."""
    import pdoc
    import pdoc.render

    pdoc.render.configure(docformat="google", search=True)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        pdoc.pdoc(*MODULES, output_directory=staging)
        old = out.with_name(f".{out.name}-old")
        if out.exists():
            out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sorted(out.rglob("*.html"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="api_reference", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("site"), help="output folder (default: site)")
    args = parser.parse_args(argv)
    pages = build(args.out)
    print(f"wrote {len(pages)} pages to {args.out}/ (open {args.out / 'index.html'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
