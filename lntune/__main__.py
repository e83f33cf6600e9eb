import sys

from lntune.cli import main

if __name__ == "__main__":  # not in spawned worker processes (lntune select), which import this module
    sys.exit(main())
