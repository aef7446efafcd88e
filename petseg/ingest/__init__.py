"""Stage 1: pet images and trimaps to a Petastorm Parquet dataset."""

from petseg.ingest.convert import IngestError, IngestReport, run_ingest

__all__ = ["IngestError", "IngestReport", "run_ingest"]
