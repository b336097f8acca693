import sys

from pipeline.cli import main

if __name__ == "__main__":  # not when a worker process imports it again (spawn)
    sys.exit(main())
