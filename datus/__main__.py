"""``python -m datus`` entry point."""

from datus.commands.cli import start

if __name__ == "__main__":
    start()
