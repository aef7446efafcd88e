"""Outputs never delete what petseg did not write, and a published output proves itself whole."""

import os

import pytest

from petseg import config
from petseg.config import ConfigError


@pytest.mark.parametrize(
    "job,overrides,message",
    [
        # A finished run given as both the model and the evaluation's folder.
        ("evaluate", ["evaluate.model={d}/run", "evaluate.dataset={d}/pets", "evaluate.output={d}/run"],
         r"evaluate.output='file://{d}/run' is the same folder as evaluate.model='file://{d}/run', an input"),
        ("infer", ["infer.model={d}/run", "infer.input={d}/photos", "infer.output={d}/photos"],
         r"infer.output='file://{d}/photos' is the same folder as infer.input"),
        ("infer", ["infer.model={d}/run", "infer.input={d}/photos/*.jpg", "infer.output={d}/photos/masks"],
         r"infer.output='file://{d}/photos/masks' lies inside infer.input='file://{d}/photos/\*.jpg'"),
        ("infer", ["infer.model={d}/run/model", "infer.input={d}/photos", "infer.output={d}/run"],
         r"infer.output='file://{d}/run' contains infer.model"),
        ("infer", ["infer.model={d}/run", "infer.input={d}/photos", "infer.output={d}/masks",
                   "infer.mode=incremental", "infer.checkpoint={d}/photos/_state"],
         r"infer.checkpoint='file://{d}/photos/_state' lies inside infer.input"),
        ("ingest", ["data.source=oxford", "data.input={d}/oxford", "data.dataset={d}/oxford"],
         r"data.dataset='file://{d}/oxford' is the same folder as data.input"),
        ("ingest", ["data.source=synthetic", "data.dataset={d}/pets", "data.rejects={d}/pets"],
         r"data.dataset='file://{d}/pets' is the same folder as data.rejects='file://{d}/pets', another output"),
        ("ingest", ["data.source=synthetic", "data.dataset={d}/pets", "data.rejects={d}/pets/rejects"],
         r"data.dataset='file://{d}/pets' contains data.rejects"),
        ("train", ["data.dataset={d}/pets", "train.output_dir={d}/pets/run"],
         r"train.output_dir='file://{d}/pets/run' lies inside data.dataset"),
    ],
)
def test_an_output_over_an_input_or_another_output_is_refused_before_spark_starts(tmp_path, job, overrides, message):
    d = str(tmp_path)
    (tmp_path / "oxford" / "images").mkdir(parents=True)
    (tmp_path / "oxford" / "annotations" / "trimaps").mkdir(parents=True)
    with pytest.raises(ConfigError, match=message.format(d=d)):
        config.load(overrides=[o.format(d=d) for o in overrides], job=job)


def test_a_link_to_an_input_is_the_input(tmp_path):
    (tmp_path / "photos").mkdir()
    os.symlink(tmp_path / "photos", tmp_path / "link")
    with pytest.raises(ConfigError, match="is the same folder as infer.input"):
        config.load(overrides=[f"infer.model={tmp_path}/run", f"infer.input={tmp_path}/photos",
                               f"infer.output={tmp_path}/link"], job="infer")


def test_folders_side_by_side_and_the_default_checkpoint_are_accepted(tmp_path):
    d = str(tmp_path)
    cfg = config.load(overrides=[f"infer.model={d}/run", f"infer.input={d}/photos", f"infer.output={d}/photos_masks",
                                 "infer.mode=incremental", f"infer.checkpoint={d}/photos_masks/_checkpoint"], job="infer")
    assert cfg.infer.output == f"file://{d}/photos_masks"
    config.load(overrides=[f"data.dataset={d}/pets", "data.source=synthetic", f"train.output_dir={d}/pets_run",
                           f"evaluate.output={d}/pets_eval", "infer.input=main.raw.photos", "infer.output=main.seg.masks"],
                job="demo")
