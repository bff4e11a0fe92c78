"""`python -m titok_jax <command>` is the same as `titok-jax <command>`."""
import sys

from titok_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
