"""``python -m olmstead``: the same command as ``olmstead``."""

from olmstead.cli.main import main

__all__: list[str] = []

if __name__ == "__main__":
    main(prog_name="olmstead")
