"""What the command line says about itself: the stages, the keys each reads, their defaults and meanings.

The meanings are base.yaml's own comments (the first sentence of the comment above each key), so a
key is explained once, where its default is set.
"""

from __future__ import annotations

import difflib
import re
from typing import NamedTuple

from omegaconf import DictConfig, OmegaConf

from petseg.config.sections import Config, redact_secrets, to_dict

#: One line per stage, in the order a pipeline runs them.
STAGES = {
    "ingest": "convert the pet dataset (Oxford-IIIT, its tfds build, or synthetic) into a Petastorm dataset",
    "train": "train the U-Net across Spark executors with MirroredStrategyRunner",
    "infer": "segment a table, Parquet folder or folder of photos into masks",
    "evaluate": "measure a model's pixel accuracy and IoU on a dataset's labelled split",
    "demo": "all four on synthetic pets on this machine (conf/local.yaml)",
}
#: What each stage reads beyond the spark section: sections, or single keys of another section.
_STAGE_KEYS = {
    "ingest": ("data",),
    "train": ("data.dataset", "data.image_size", "model", "train", "mlflow"),
    "infer": ("infer", "data.max_image_pixels", "mlflow"),
    "evaluate": ("evaluate", "data.max_image_pixels", "mlflow"),
    "demo": ("data", "model", "train", "infer", "evaluate", "mlflow"),
}
_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.]*):(?P<value>.*)$")


class KeyDoc(NamedTuple):
    """A config key as base.yaml sets it: its default (as written there) and the first sentence of its comment."""

    key: str
    default: str
    meaning: str


def key_docs(base_yaml: str) -> dict[str, KeyDoc]:
    """Every key base.yaml sets, by dotted name, with its default and meaning (empty when uncommented)."""
    docs: dict[str, KeyDoc] = {}
    path: list[tuple[int, str]] = []
    comment: list[str] = []
    for line in base_yaml.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped.lstrip("#").strip())
            continue
        match = _KEY_LINE.match(line)
        if match is None:
            comment = []
            continue
        indent = len(match["indent"])
        path = [(i, k) for i, k in path if i < indent]
        value = match["value"].strip()
        if value:
            key = ".".join([k for _, k in path] + [match["key"]])
            docs[key] = KeyDoc(key, value, _first_sentence(" ".join(comment)))
        else:
            path.append((indent, match["key"]))
        comment = []
    return docs


#: The longest meaning a help line shows; the rest is in base.yaml.
_MEANING_CHARS = 100


def _first_sentence(text: str) -> str:
    end = re.search(r"(?<=[^.][.!?])\s", text)  # not after "...", which lists
    sentence = text[: end.start()] if end else text
    if len(sentence) <= _MEANING_CHARS:
        return sentence
    return sentence[: sentence.rfind(" ", 0, _MEANING_CHARS - 3)] + " ..."


def overview() -> str:
    """``petseg --help``: the usage and one line per stage."""
    width = max(map(len, STAGES))
    lines = ["usage: petseg <stage> [--conf FILE ...] [key=value ...] [--print-config]", "", "stages:"]
    lines += [f"  {name.ljust(width)}  {line}" for name, line in STAGES.items()]
    lines += ["", "petseg <stage> --help lists the keys a stage reads, with their defaults and meanings."]
    return "\n".join(lines)


def stage_help(job: str, *, base_yaml: str) -> str:
    """``petseg <stage> --help``: the stage's line and every key it reads, default and meaning."""
    docs = key_docs(base_yaml)
    wanted = ("spark", *_STAGE_KEYS[job])
    keys = [k for k in docs if any(k == w or k.startswith(w + ".") for w in wanted)]
    width = max(len(k) for k in keys)
    lines = [f"petseg {job}: {STAGES[job]}", "", f"usage: petseg {job} [--conf FILE ...] [key=value ...] [--print-config]",
             "", "keys (default, meaning; set any in a --conf file or as key=value):"]
    for key in keys:
        doc = docs[key]
        lines.append(f"  {key.ljust(width)}  {doc.default}" + (f"  # {doc.meaning}" if doc.meaning else ""))
    return "\n".join(lines)


def resolved_yaml(cfg: Config) -> str:
    """A validated config as YAML, credentials redacted: what ``--print-config`` prints."""
    return OmegaConf.to_yaml(OmegaConf.create(redact_secrets(to_dict(cfg))))


def all_keys() -> list[str]:
    """Every dotted key of the config schema (``spark.conf`` as one key: it takes any Spark conf)."""
    found: list[str] = []

    def walk(node: DictConfig, prefix: str) -> None:
        for name in node.keys():
            key = f"{prefix}{name}"
            child = node._get_node(name)
            if isinstance(child, DictConfig) and key != "spark.conf":
                walk(child, key + ".")
            else:
                found.append(key)

    walk(OmegaConf.structured(Config), "")
    return found


def nearest_keys(key: str) -> list[str]:
    """The schema keys closest to a misspelt one, best first (``infer.modle``: ``infer.mode``, ``infer.model``)."""
    return difflib.get_close_matches(key, all_keys(), n=2, cutoff=0.8)
