"""Stage one self-contained bundle per function: what it loads at runtime, nothing else.

Each holds its main.py, shared/, requirements.txt, the pipeline the functions read
(SMART_RESUME_PIPELINE, else pipeline.toml; never both, nor the demo's examples/ unless the
pipeline names them), the local packages its python operations target and a custom
SMART_RESUME_MODULE's; no caches or tests.
"""

from __future__ import annotations

import os
import shutil
import tomllib
from collections.abc import Mapping
from pathlib import Path

from deploy import Failed, note

FUNCTIONS = ("smart_resume", "smart_resume_status")
#: Never staged: caches and tests. Nor, as a package of operations, the bundle's own parts.
SKIPPED = "__pycache__ *.py[co] .pytest_cache tests test_*.py *_test.py conftest.py .DS_Store"
NOT_PACKAGES = ("shared", "functions", "tests", "build")


def _copy_tree(source: Path, dest: Path) -> None:
    ignore = shutil.ignore_patterns(*SKIPPED.split())
    shutil.copytree(source, dest, symlinks=True, ignore=ignore, dirs_exist_ok=True)


def pipeline_targets(root: Path, pipeline: str) -> list[str]:
    """The top-level names of the modules that the pipeline's python operations target."""
    try:
        spec = tomllib.loads((root / pipeline).read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise Failed(1, f"{pipeline} is not valid TOML: {e}") from e
    targets = [op.get("target") for op in spec.get("operation", []) if isinstance(op, dict)]
    targets = [t.strip() for t in targets if isinstance(t, str) and t.strip()]
    return [target.split(":")[0].split(".")[0] for target in targets]


def stage(root: Path, build_dir: str, values: Mapping[str, str]) -> Path:
    """Build <build_dir>/<function>/ for both functions, each replaced whole; the folder."""
    pipelines = []
    if values.get("SMART_RESUME_PIPELINE"):
        pipelines.append(values["SMART_RESUME_PIPELINE"].removeprefix("./"))
    elif (root / "pipeline.toml").is_file():
        pipelines.append("pipeline.toml")
    else:
        note(f"note: no pipeline.toml in {root}; staging without one")
    names = [name for pipeline in pipelines for name in pipeline_targets(root, pipeline)]
    if values.get("SMART_RESUME_MODULE"):
        names.append(values["SMART_RESUME_MODULE"].split(".")[0])
    local = [n for n in names if (root / n).is_dir() or (root / f"{n}.py").is_file()]
    packages = [n for n in dict.fromkeys(local) if n not in NOT_PACKAGES]
    build = Path(os.path.abspath(build_dir))
    for fn in FUNCTIONS:
        dest, main = build / fn, root / "functions" / fn / "main.py"
        if (dest / "main.py").exists() and (dest / "main.py").samefile(main):
            raise Failed(2, f"--build-dir {build} would overwrite the sources")
        shutil.rmtree(dest, ignore_errors=True)
        _copy_tree(root / "shared", dest / "shared")
        shutil.copy(main, dest)
        shutil.copy(root / "requirements.txt", dest)
        for path in pipelines:
            (dest / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / path, dest / path)
        for name in packages:
            if (root / name).is_dir():
                _copy_tree(root / name, dest / name)
            else:
                shutil.copy(root / f"{name}.py", dest)
    staged = " ".join(pipelines) or "none"
    staged += f"; with {' '.join(packages)}" if packages else ""
    note(f"staged {' '.join(FUNCTIONS)} into {build} (pipeline: {staged})")
    return build
