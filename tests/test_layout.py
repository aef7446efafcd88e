"""The shape of the code: no import cycles, unique module names, light imports where they must stay light,
and entry points that only hand their arguments to petseg.cli."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "petseg"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(module: str) -> set[str]:
    """petseg modules that ``module`` imports anywhere in its body, functions included."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in MODULES and name != module}
    return found


def test_no_import_cycles():
    graph = {module: _imports(module) for module in MODULES}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = path[path.index(module):] + [module]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for imported in sorted(graph[module]):
            # A package's __init__ re-exporting its own modules is not a cycle through them.
            if not imported.startswith(module + "."):
                visit(imported, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


#: The stages, side by side on the base: none imports another, and the base (everything else but the
#: command line, which runs them all) imports none.
STAGES = ("petseg.ingest", "petseg.train", "petseg.infer", "petseg.evaluate")


def _stage(module: str) -> str | None:
    return next((s for s in STAGES if module == s or module.startswith(s + ".")), None)


def _package(module: str) -> str:
    """The top-level part of petseg a module belongs to: petseg.io for petseg.io.fs."""
    return ".".join(module.split(".")[:2])


def test_stages_stand_side_by_side_on_the_base():
    crossings = sorted(f"{module} imports {imported}" for module in MODULES if module != "petseg.cli"
                       for imported in _imports(module) if _stage(imported) not in (None, _stage(module)))
    assert crossings == []


def test_the_base_packages_import_one_another_without_a_loop():
    """config -> io -> session -> config was one: each part of the base sits above or below another."""
    graph: dict[str, set[str]] = {}
    for module in MODULES:
        if _stage(module) is None and module not in ("petseg", "petseg.cli"):
            graph.setdefault(_package(module), set()).update(
                _package(m) for m in _imports(module) if _package(m) != _package(module) and m != "petseg")

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph.get(start, ()))

    assert sorted(p for p in graph if reaches(p, p, set())) == []


def test_no_two_modules_share_a_name():
    stems: dict[str, list[str]] = {}
    for module, path in MODULES.items():
        if path.name != "__init__.py":
            stems.setdefault(path.stem, []).append(module)
    assert {stem: mods for stem, mods in stems.items() if len(mods) > 1} == {}


def _loaded_after_import(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "TF_USE_LEGACY_KERAS": "1"})
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


@pytest.mark.parametrize("module", ["petseg.ingest", "petseg.infer", "petseg.evaluate", "petseg.cli", "petseg.config"])
def test_stages_import_without_tensorflow(module):
    loaded = _loaded_after_import(f"import {module}")
    assert "tensorflow" not in loaded and "tf_keras" not in loaded


def test_inference_code_on_an_executor_pulls_in_neither_training_nor_petastorm_nor_mlflow():
    # What the UDF imports on an executor: the segmentation core, the model artifact, file reads.
    loaded = _loaded_after_import(
        "import petseg.infer, petseg.model.segment, petseg.model.artifact, petseg.io.fs, petseg.evaluate"
    )
    assert not {m for m in loaded if m.startswith(("petseg.train", "petastorm", "mlflow"))}


def test_the_mlflow_model_imports_where_there_is_no_spark():
    # Model Serving and plain Python environments load the pyfunc training logs: no pyspark there.
    loaded = _loaded_after_import('sys.modules["pyspark"] = None; import petseg.model.pyfunc')
    assert "petseg.model.pyfunc" in loaded and not {m for m in loaded if m.startswith("petseg.train")}


def test_training_reads_its_arrays_without_petastorm():
    loaded = _loaded_after_import("import petseg.data.reader, petseg.train.feed")
    assert not {m for m in loaded if m.startswith("petastorm")}


@pytest.mark.parametrize("job", ["ingest", "train", "infer", "evaluate"])
def test_jobs_end_a_bad_configuration_with_one_line(job):
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / f"{job}.py"), "data.image_size=tiny"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"petseg: {job} failed: bad value for config key 'data.image_size': Value 'tiny'")


def test_a_job_ends_bad_input_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / "infer.py"), "spark.master=local[1]",
                           f"infer.model={tmp_path / 'no-run'}", f"infer.input={tmp_path / 'in'}", f"infer.output={tmp_path / 'o'}"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYSPARK_PYTHON": sys.executable})
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("petseg: infer failed: model ") and "does not exist" in last


def test_a_job_under_spark_submit_ends_bad_input_with_one_line_below_the_jvms_shutdown(tmp_path):
    # Under spark-submit the driver JVM outlives Python, and its shutdown hooks log after Python's last
    # line; it also relays Python's stderr on its stdout. So the console is both streams, as written.
    submit = Path(sys.executable).parent / "spark-submit"
    done = subprocess.run([str(submit), "--master", "local[1]", str(ROOT / "jobs" / "infer.py"),
                           f"infer.model=file://{tmp_path / 'no-run'}", f"infer.input=file://{tmp_path / 'in'}",
                           f"infer.output=file://{tmp_path / 'o'}"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
                          env={**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable})
    assert done.returncode == 1, done.stdout[-2000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("petseg: infer failed: model ") and "does not exist" in last, done.stdout[-2000:]


def test_a_jvm_failure_ends_with_one_line_under_its_trace(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / "ingest.py"), "spark.master=local[1]", "data.source=oxford",
                           "data.input=hdfs://no host/pets", f"data.dataset={tmp_path / 'pets'}"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYSPARK_PYTHON": sys.executable})
    assert done.returncode == 1, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == ("petseg: ingest failed: java.io.IOException: Incomplete HDFS URI, no host: "
                         "hdfs://no%20host/pets/images (the full error is above)")
    assert any(line.startswith("py4j.protocol.Py4JJavaError") for line in lines[:-1])  # the trace stays


def test_the_reason_of_a_spark_failure_is_its_message_not_its_trace(spark, tmp_path):
    from py4j.protocol import Py4JJavaError
    from pyspark.errors import AnalysisException

    from petseg.cli import failure_reason

    with pytest.raises(AnalysisException) as missing:
        spark.read.parquet(str(tmp_path / "nothing"))
    assert failure_reason(missing.value) == (
        f"AnalysisException: [PATH_NOT_FOUND] Path does not exist: file:{tmp_path / 'nothing'}. (the full error is above)"
    )

    def fail(_):
        raise ValueError("row 7 has no image\nsecond line")

    with pytest.raises(Py4JJavaError) as task:
        spark.sparkContext.parallelize([1], 1).map(fail).collect()
    assert failure_reason(task.value) == "ValueError: row 7 has no image (the full error is above)"


#: The pages a user reads: the README, docs/ and the benchmarks' page. Everything they name must exist.
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]


def _page_texts() -> dict[str, str]:
    return {str(page.relative_to(ROOT)): page.read_text() for page in PAGES}


def _code(text: str) -> str:
    """The fenced blocks and inline code spans of a page: where commands are written."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    rest = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    return "\n".join(fenced + re.findall(r"`([^`\n]+)`", rest))


def test_the_docs_pages_exist_and_the_readme_links_each():
    readme = (ROOT / "README.md").read_text()
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert pages and [p.name for p in pages if f"](docs/{p.name})" not in readme] == []
    assert "](bench/README.md)" in readme


def test_every_path_the_docs_name_exists():
    missing = set()
    for page, text in _page_texts().items():
        named = set(re.findall(r"\b((?:petseg|jobs|tools|bench|tests|conf|docs|resources)/[\w/.-]*\w)", text))
        missing |= {f"{page}: {p}" for p in named if not (ROOT / p).exists()}
    assert sorted(missing) == []


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(text: str) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    body = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    for heading in re.findall(r"^#+ (.+)$", body, flags=re.M):
        slug = _slug(heading)
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


def test_every_link_in_the_docs_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"\w+://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and anchor not in _anchors(linked.read_text()):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []


def test_the_layout_block_in_the_docs_names_every_room_and_only_files_that_exist():
    # docs/architecture.md's Layout block names files under their folder: each must be there, and
    # every room of petseg/ is named.
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("## Layout\n", 1)[1].split("```")[1]
    folder, missing = None, []
    for line in block.splitlines():
        label = re.match(r"^  (\w+)/\s", line)
        if label:
            folder = PACKAGE / label.group(1)
        elif re.match(r"^  \S", line):
            folder = PACKAGE
        elif not line.startswith("   "):
            folder = None
        if folder is not None:
            missing += [str(folder / name) for name in re.findall(r"\b(\w+\.py)\b", line) if not (folder / name).exists()]
    assert missing == []
    rooms = {p.name if p.suffix == ".py" else f"{p.name}/" for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").exists()}
    assert rooms - set(re.findall(r"\b(\w+\.py|\w+/)", block)) == set()


#: Names the pages write like config keys that are Python: Keras's and MLflow's own calls.
NOT_KEYS = ("model.fit", "model.predict", "mlflow.pyfunc")
#: ...and file names (data.md, train.py), which are not keys either.
FILE_TYPES = (".py", ".md", ".yml", ".yaml", ".json", ".png", ".txt")


def test_every_config_key_the_docs_name_exists():
    from petseg.config.describe import all_keys

    keys = set(all_keys())
    prefixes = {key.rsplit(".", n)[0] for key in keys for n in range(key.count("."))}
    spark_keys = {key.split(".")[1] for key in keys if key.startswith("spark.")}
    unknown = set()
    for page, text in _page_texts().items():
        for name in re.findall(r"(?<![\w./-])((?:spark|data|model|train|infer|evaluate|mlflow)(?:\.[A-Za-z_]\w*)+)(?![\w(])",
                               text):
            if name.endswith(FILE_TYPES) or name.startswith(NOT_KEYS):
                continue
            if name.startswith("spark.") and name.split(".")[1] not in spark_keys:
                continue  # one of Spark's own confs
            if name not in keys and name not in prefixes and not name.startswith("spark.conf."):
                unknown.add(f"{page}: {name}")
    assert sorted(unknown) == []


def _makefile_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))


def test_every_command_and_make_target_the_docs_name_exists():
    from petseg.config import JOBS

    targets = _makefile_targets()
    bundle = (ROOT / "databricks.yml").read_text() + "".join(p.read_text() for p in (ROOT / "resources").glob("*.yml"))
    unknown = set()
    for page, text in _page_texts().items():
        code = re.sub(r"(^|\s)#.*$", "", _code(text), flags=re.M)  # shell comments are prose
        unknown |= {f"{page}: make {t}" for t in re.findall(r"\bmake ([a-z][\w-]*)", code) if t not in targets}
        unknown |= {f"{page}: petseg {job}" for job in re.findall(r"(?:^|[\s/])petseg ([a-z]\w*)", code, flags=re.M) if job not in JOBS}
        unknown |= {f"{page}: bundle job {job}" for job in re.findall(r"databricks bundle run (\w+)", code)
                    if not re.search(rf"^\s+{job}:", bundle, flags=re.M)}
        unknown |= {f"{page}: bundle target {t}" for t in re.findall(r"databricks bundle \w+ .*?-t ([\w-]+)", code)
                    if not re.search(rf"^\s+{t}:", bundle, flags=re.M)}
    assert sorted(unknown) == []


def _defines(module: str) -> set[str]:
    """The names a petseg module defines or imports at its top level, and what its __all__ offers."""
    tree = ast.parse(MODULES[module].read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
                if isinstance(target, ast.Name) and target.id == "__all__" and isinstance(node.value, (ast.List, ast.Tuple)):
                    names |= {e.value for e in node.value.elts if isinstance(e, ast.Constant)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return names


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        if module in MODULES:
            rest = parts[cut:]
            return not rest or rest[0] in _defines(module)
    return False


def test_every_petseg_name_the_docs_import_or_name_exists():
    unknown = set()
    for page, text in _page_texts().items():
        named = set(re.findall(r"(?<![\w./-])(petseg(?:\.\w+)+)", text))
        for module, imported in re.findall(r"from (petseg(?:\.\w+)*) import ([\w, ]+)", _code(text)):
            named |= {f"{module}.{name.strip()}" for name in imported.split(",")}
        unknown |= {f"{page}: {name}" for name in named if not _resolves(name)}
    assert sorted(unknown) == []


def test_ingest_prints_no_petastorm_warnings(tmp_path):
    # petastorm writes the dataset's metadata on the driver and in Spark tasks (Python workers); on a local
    # master both print to this console.
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / "ingest.py"), "spark.master=local[1]", "data.source=synthetic",
                           "data.synthetic_count=20", "data.image_size=32", "data.min_row_groups_per_split=2",
                           f"data.dataset={tmp_path / 'pets'}"],
                          capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ingest: read 20, written 20, rejected 0" in done.stdout
    assert "Warning" not in done.stdout + done.stderr, done.stderr[-3000:]


#: What must never reach the console: TensorFlow's C++ start-up lines, and pyarrow's FutureWarnings
#: about petastorm's calls.
START_UP_NOISE = ("oneDNN custom operations", "Could not find cuda drivers", "failed call to cuInit",
                  "absl::InitializeLog", "FutureWarning")


def test_infer_and_evaluate_print_no_start_up_noise(spark, exported_run, tmp_path):
    # On a local master the executors' Python workers write to this console too; a fresh shell has
    # none of the variables petseg sets for its own children.
    from conftest import synthetic_dataset

    pets = synthetic_dataset(spark, tmp_path, synthetic_count=20, image_size=32, min_row_groups_per_split=1)
    env = {k: v for k, v in os.environ.items() if k not in ("PYSPARK_PYTHON", "TF_CPP_MIN_LOG_LEVEL", "PYTHONWARNINGS")}
    for job, args in (("infer", [f"infer.input={pets}", f"infer.output={tmp_path / 'masks'}"]),
                      ("evaluate", [f"evaluate.dataset={pets}", f"evaluate.output={tmp_path / 'eval'}"])):
        done = subprocess.run([sys.executable, "-m", "petseg.cli", job, "spark.master=local[2]",
                               f"infer.model={exported_run}", *args],
                              capture_output=True, text=True, timeout=300, env=env)
        console = done.stdout + done.stderr
        assert done.returncode == 0, console[-3000:]
        assert [noise for noise in START_UP_NOISE if noise in console] == [], (job, console[-3000:])
