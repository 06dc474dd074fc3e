"""`python -m attncc ...`: the same as the `attncc` console script."""

from attncc.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
