"""``python -m accumulate``: see `accumulate.paper.cli`."""

from accumulate.paper.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
