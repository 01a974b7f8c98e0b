"""`python -m boltzgen` is the `boltzgen` command."""

from boltzgen.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
