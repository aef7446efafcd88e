"""petseg: U-Net pet segmentation on Spark (Petastorm ingest, distributed TensorFlow training, UDF inference)."""

__version__ = "0.1.0"
