"""``python -m sandboxd``: the same entry point as the ``sandboxd`` console script."""

from sandboxd.cli import main

if __name__ == "__main__":
    main()
