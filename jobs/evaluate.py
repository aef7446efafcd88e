"""spark-submit entry point for evaluation: ``spark-submit jobs/evaluate.py [--conf FILE ...] [key=value ...]``."""

import logging
import sys

from petseg.config import parse_job_arguments
from petseg.evaluate import run_evaluate
from petseg.session import get_or_create

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = parse_job_arguments(sys.argv[1:], job="evaluate")
    print(run_evaluate(get_or_create(cfg.spark), evaluate=cfg.evaluate).format())
