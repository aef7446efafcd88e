"""The Databricks bundle against the code: entry points exist, every parameter is a key the job accepts."""

import functools
import re
from pathlib import Path

import pytest
import tomllib
import yaml

from petseg import config, env
from petseg.io import urls

ROOT = Path(__file__).resolve().parent.parent


def _bundle() -> tuple[dict, dict[str, Path]]:
    """The bundle with its included resources merged, and the file that defines each job."""
    bundle = yaml.safe_load((ROOT / "databricks.yml").read_text())
    sources: dict[str, Path] = {}
    for pattern in bundle.get("include", []):
        for path in sorted(ROOT.glob(pattern)):
            for key, value in yaml.safe_load(path.read_text())["resources"].items():
                bundle.setdefault("resources", {}).setdefault(key, {}).update(value)
                if key == "jobs":
                    sources.update({name: path for name in value})
    return bundle, sources


def _substitute(value: str, variables: dict[str, str], target: str) -> str:
    def one(match: re.Match) -> str:
        name = match.group(1)
        if name == "bundle.target":
            return target
        assert name.startswith("var.") and name[4:] in variables, f"undefined bundle variable ${{{name}}}"
        return str(variables[name[4:]])

    return re.sub(r"\$\{([^}]+)\}", one, value)


BUNDLE, SOURCES = _bundle()
TARGETS = list(BUNDLE["targets"])
TASKS = [(job, task) for job, spec in BUNDLE["resources"]["jobs"].items() for task in spec["tasks"]]


#: The Databricks Runtime ML line each Spark and Python pair is: the runtimes petseg's pipeline targets.
LTS_ML_RUNTIMES = {"15.4": "scala2.12", "16.4": "scala2.12", "17.3": "scala2.13"}


def _variables(target: str) -> dict[str, str]:
    """The bundle's variables as ``target`` sets them: its own values over the defaults."""
    variables = {name: spec.get("default") for name, spec in BUNDLE["variables"].items()}
    variables.update(BUNDLE["targets"][target].get("variables", {}))
    return variables


def _invocation(task: dict, target: str) -> config.Invocation:
    """The task's parameters under ``target``, parsed as its entry point parses them."""
    return _parsed(tuple(str(a) for a in task["python_wheel_task"]["parameters"]), target)


@functools.lru_cache(maxsize=None)
def _parsed(parameters: tuple[str, ...], target: str) -> config.Invocation:
    # Parsed once per run: two tests read each task's config (neither changes it).
    variables = _variables(target)
    return config.parse_command_line([_substitute(a, variables, target) for a in parameters])


def test_only_development_targets_are_the_default_and_prod_deploys_in_production_mode():
    # `databricks bundle deploy` without -t deploys the default target: never the production one.
    defaults = [name for name, spec in BUNDLE["targets"].items() if spec.get("default")]
    assert len(defaults) == 1 and BUNDLE["targets"][defaults[0]]["mode"] == "development", defaults
    assert BUNDLE["targets"]["prod"]["mode"] == "production"


def test_every_target_runs_a_gpu_ml_runtime_of_an_lts_line_and_together_they_cover_every_line():
    cluster = BUNDLE["resources"]["jobs"]["petseg_pipeline"]["job_clusters"][0]["new_cluster"]
    runtimes = {}
    for target in TARGETS:
        version = _substitute(cluster["spark_version"], _variables(target), target)
        line, _, rest = version.partition(".x-")
        assert rest == f"gpu-ml-{LTS_ML_RUNTIMES.get(line)}", f"{target}: {version} is not a GPU ML runtime of an LTS line"
        runtimes[target] = line
    assert runtimes["prod"] == runtimes[next(t for t, s in BUNDLE["targets"].items() if s.get("default"))], runtimes
    assert set(runtimes.values()) == set(LTS_ML_RUNTIMES), runtimes


def test_the_job_cluster_gives_training_what_it_needs():
    job = BUNDLE["resources"]["jobs"]["petseg_pipeline"]
    clusters = {c["job_cluster_key"]: c["new_cluster"] for c in job["job_clusters"]}
    assert {t["job_cluster_key"] for t in job["tasks"]} <= set(clusters)
    # 16.4 and 17.3 ML pre-install no spark-tensorflow-distributor: training installs the one petseg[ml] names.
    train = next(t for t in job["tasks"] if t["task_key"] == "train")
    wanted = next(r for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["ml"]
                  if r.startswith("spark-tensorflow-distributor"))
    assert {"pypi": {"package": wanted}} in train["libraries"]
    cluster = clusters[train["job_cluster_key"]]
    conf = cluster["spark_conf"]
    # A whole GPU per task (the runner's barrier tasks, the inference UDF), and no more than an
    # executor has: Spark would never schedule a task that asks for more.
    assert float(conf["spark.task.resource.gpu.amount"]) == 1 <= float(conf["spark.executor.resource.gpu.amount"])
    # tf-keras on the driver and on every executor, under the name petseg itself sets.
    assert cluster["spark_env_vars"][env.LEGACY_KERAS_ENV] == conf[f"spark.executorEnv.{env.LEGACY_KERAS_ENV}"] == "1"


#: Config keys whose location each job writes, and reads, in the sections that job validates.
WRITES = {"ingest": ("data.dataset", "data.rejects"), "train": ("train.output_dir",), "infer": ("infer.output",),
          "evaluate": ("evaluate.output",)}
READS = {"ingest": ("data.input",), "train": ("data.dataset",), "infer": ("infer.model", "infer.input"),
         "evaluate": ("evaluate.model", "evaluate.dataset")}


def _locations(cfg: config.Config, keys: tuple[str, ...]) -> set[str]:
    values = [getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) for key in keys]
    return {str(v).rstrip("/") for v in values if v}


@pytest.mark.parametrize("target", TARGETS)
def test_each_task_runs_after_the_tasks_that_write_what_it_reads(target):
    """The order of a job is its depends_on edges, not the order its tasks are listed in: a task that
    reads what another writes must depend on it (else it may read the last run's), one that reads
    nothing of the job's own writes must not wait for any, and no two tasks write one location."""
    written: dict[str, str] = {}
    for job, spec in BUNDLE["resources"]["jobs"].items():
        invocations = {task["task_key"]: _invocation(task, target) for task in spec["tasks"]}
        writes = {key: _locations(inv.config, WRITES[inv.job]) for key, inv in invocations.items()}
        for key, locations in writes.items():
            for location in locations:
                assert location not in written, f"{job}.{key} and {written[location]} both write {location}"
                written[location] = f"{job}.{key}"
        after = {task["task_key"]: {d["task_key"] for d in task.get("depends_on", [])} for task in spec["tasks"]}

        def upstream(key: str) -> set[str]:
            return set().union(*[{d} | upstream(d) for d in after[key]])

        for key, inv in invocations.items():
            reads = _locations(inv.config, READS[inv.job])
            producers = {other for other, locations in writes.items() if other != key and reads & locations}
            assert producers <= upstream(key), \
                f"{job}.{key} reads what {producers - upstream(key)} write without depending on them"
            assert bool(producers) == bool(after[key]), \
                f"{job}.{key}: depends on {after[key]}, reads what {producers} write"


def test_every_wheel_path_names_the_built_wheel_from_the_file_that_holds_it():
    """Bundle paths resolve against the file they are written in: a resources/ file reaches the
    wheel that the artifact build writes to <root>/dist as ../dist/*.whl."""
    built = ROOT / BUNDLE["artifacts"]["petseg_wheel"]["path"] / "dist"
    for job, spec in BUNDLE["resources"]["jobs"].items():
        paths = [lib["whl"] for task in spec["tasks"] for lib in task.get("libraries", []) if "whl" in lib]
        paths += [dep for env in spec.get("environments", []) for dep in env["spec"].get("dependencies", [])
                  if dep.endswith(".whl")]
        assert paths, f"job {job} installs no wheel"
        for path in paths:
            resolved = (SOURCES[job].parent / path).resolve()
            assert resolved.parent == built.resolve() and resolved.name == "*.whl", f"{job}: {path} -> {resolved}"


def test_the_serverless_job_runs_only_the_connect_jobs_in_a_python_312_environment_with_the_wheel():
    from packaging.specifiers import SpecifierSet

    from petseg.config.checks import CONNECT_JOBS

    job = BUNDLE["resources"]["jobs"]["petseg_serverless_infer"]
    assert "job_clusters" not in job
    environments = {env["environment_key"]: env["spec"] for env in job["environments"]}
    # Version 4 is Python 3.12 with Databricks Connect 17 (Spark 4.0): what .venv-spark4 is, and
    # what petseg's requires-python must admit.
    requires = SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
    assert "3.12.3" in requires and all(spec["environment_version"] == "4" for spec in environments.values())
    assert all(any(dep.startswith("mlflow") for dep in spec["dependencies"]) for spec in environments.values())
    for task in job["tasks"]:
        assert task["task_key"] in CONNECT_JOBS
        assert "job_cluster_key" not in task and "new_cluster" not in task and "libraries" not in task
        assert any(dep.endswith(".whl") for dep in environments[task["environment_key"]]["dependencies"])


#: What the serverless job segments with: the version of the trained model that carries the alias.
REGISTERED_MODEL = "models:/{model_name}@{serving_alias}"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("job,task", TASKS, ids=[t["task_key"] for _, t in TASKS])
def test_every_task_runs_a_console_script_with_valid_keys(job, task, target):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    wheel_task = task["python_wheel_task"]
    assert wheel_task["package_name"] == "petseg"
    assert wheel_task["entry_point"] in scripts, f"{wheel_task['entry_point']} is not in [project.scripts]"
    variables = _variables(target)
    # The same parser the entry point runs: an unknown key, a bad value or a missing required key fails.
    invocation = _invocation(task, target)
    assert invocation.job == task["task_key"]
    cfg = invocation.config
    # Paths are Unity Catalog volumes (local mounts on Databricks) and outputs can be catalog tables.
    if invocation.job == "infer":
        assert cfg.infer.output.count(".") == 2 and urls.is_table_name(cfg.infer.output)
        # The pipeline segments with the run it trained; the serverless job with the registered version.
        assert cfg.infer.model.startswith("file:///Volumes/") or cfg.infer.model == REGISTERED_MODEL.format(**variables)
    if invocation.job == "evaluate":
        assert cfg.evaluate.model.startswith("file:///Volumes/") or cfg.evaluate.model == REGISTERED_MODEL.format(**variables)
    if invocation.job in ("ingest", "train"):
        assert cfg.data.dataset.startswith("file:///Volumes/")
    if invocation.job == "train":
        assert cfg.train.use_gpu and cfg.train.num_slots == int(variables["gpu_workers"])
        # Unity Catalog's three-level name, in its registry: what the serverless job's models:/ URI names.
        assert cfg.mlflow.registered_model_name == variables["model_name"] and variables["model_name"].count(".") == 2
    if invocation.job == "train" or urls.is_mlflow_uri(cfg.infer.model or cfg.evaluate.model or ""):
        assert cfg.mlflow.registry_uri == "databricks-uc"
    if invocation.job in ("train", "infer"):  # a job has no notebook experiment: name one
        assert cfg.mlflow.enabled and cfg.mlflow.experiment == variables["experiment"]
