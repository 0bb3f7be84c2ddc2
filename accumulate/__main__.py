"""``python -m accumulate``: see `accumulate.cli`."""

from accumulate.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
