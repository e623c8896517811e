"""Entry script of the single-file build (``make dist``): the console script's ``main``."""

from sandboxd.cli import main

if __name__ == "__main__":
    main()
