"""``python -m datus`` entry point."""

from datus.cli import start

if __name__ == "__main__":
    start()
