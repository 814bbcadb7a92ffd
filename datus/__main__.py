"""``python -m datus`` entry point."""

from datus.cli import main

if __name__ == "__main__":
    main()
