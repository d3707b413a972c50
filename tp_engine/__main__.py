import sys

from tp_engine.cli import main

if __name__ == "__main__":
    sys.exit(main())
