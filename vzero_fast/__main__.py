"""`python -m vzero_fast ...` is the `vzero-fast` command (torchrun launches it this way)."""

from vzero_fast.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
