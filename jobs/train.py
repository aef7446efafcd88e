"""spark-submit entry point for stage 2: ``spark-submit jobs/train.py [--conf FILE ...] [key=value ...]``."""

import logging
import sys

from petseg.config import parse_job_arguments
from petseg.session import get_or_create
from petseg.train import run_train

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = parse_job_arguments(sys.argv[1:], job="train")
    print(run_train(get_or_create(cfg.spark), cfg=cfg).format())
