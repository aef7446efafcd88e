"""spark-submit entry point for stage 1, ingest: ``spark-submit jobs/ingest.py [--conf FILE ...] [key=value ...]``.

It only hands its arguments to the console script's main, which parses them, runs the job and ends a
failed one with one readable line and a non-zero exit status.
"""

import sys

from petseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
