"""``python -m datus`` entry point."""

from datus.cli import console_main

if __name__ == "__main__":
    console_main()
