"""spark-submit entry point for stage 3: ``spark-submit jobs/infer.py [--conf FILE ...] [key=value ...]``."""

import logging
import sys

from petseg.config import parse_job_arguments
from petseg.infer.job import run_infer
from petseg.session import get_or_create

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = parse_job_arguments(sys.argv[1:], job="infer")
    print(run_infer(get_or_create(cfg.spark), infer=cfg.infer, tracking=cfg.mlflow).format())
