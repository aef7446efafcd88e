"""spark-submit entry point for stage 1: ``spark-submit jobs/ingest.py [--conf FILE ...] [key=value ...]``."""

import logging
import sys

from petseg.config import parse_job_arguments
from petseg.ingest.convert import run_ingest
from petseg.session import get_or_create

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = parse_job_arguments(sys.argv[1:])
    print(run_ingest(get_or_create(cfg.spark), data=cfg.data).format())
