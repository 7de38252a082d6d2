"""`python -m ovlfsck` behaves like the `ovlfsck` command."""
from ovlfsck.cli import main

if __name__ == "__main__":
    main()
