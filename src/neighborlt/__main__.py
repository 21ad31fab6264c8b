"""``python -m neighborlt`` (also what ``torchrun -m neighborlt train ...`` runs)."""

from .cli import main

if __name__ == "__main__":
    main()
