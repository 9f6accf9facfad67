"""Bench 2: cold start: import time of each function's main.py in a fresh interpreter.

Compared with `import google.cloud.firestore` alone (the floor every function pays), median of
N fresh interpreters each. Target: main.py <= 1.3x firestore alone. Also lists the heaviest
modules main.py pulls in beyond firestore (from `python -X importtime`).
"""

from __future__ import annotations

import os
import subprocess
import sys

import _emulator as E

TIMED = """
import sys, time
t = time.perf_counter()
{body}
print(time.perf_counter() - t)
"""
LOAD_MAIN = """
import importlib.util
spec = importlib.util.spec_from_file_location("main", {path!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
"""
CASES = {
    "import google.cloud.firestore": "import google.cloud.firestore",
    "import functions_framework + firestore": "import functions_framework, google.cloud.firestore",
    "functions/smart_resume/main.py": LOAD_MAIN.format(
        path=str(E.ROOT / "functions/smart_resume/main.py")
    ),
    "functions/smart_resume_status/main.py": LOAD_MAIN.format(
        path=str(E.ROOT / "functions/smart_resume_status/main.py")
    ),
}
HEAVY = ("sendgrid", "boto3", "botocore", "python_http_client", "requests", "tenacity", "jinja2")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMART_RESUME_")}
    env["PYTHONDONTWRITEBYTECODE"] = "0"
    return env


def _time(body: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", TIMED.format(body=body)],
        cwd=E.ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def _importtime(body: str) -> dict[str, int]:
    """Cumulative microseconds per top-level package, from -X importtime."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", body],
        cwd=E.ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    tops: dict[str, int] = {}
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = [p.strip() for p in line[len("import time:") :].split("|")]
        try:
            self_us = int(parts[0])
        except ValueError:
            continue
        top = parts[2].strip().split(".")[0]
        tops[top] = tops.get(top, 0) + self_us
    return tops


def run(quick: bool = E.QUICK) -> dict[str, float]:
    n = 5 if quick else 9
    for body in CASES.values():  # warm the bytecode cache and the page cache
        _time(body)
    samples: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(n):  # interleaved, so drift hits every case alike
        for name, body in CASES.items():
            samples[name].append(_time(body))
    medians = {name: E.median(v) for name, v in samples.items()}
    base = medians["import google.cloud.firestore"]
    rows = [
        [name, n, f"{medians[name] * 1000:.0f}", f"{medians[name] / base:.2f}x"] for name in CASES
    ]
    lines = E.table(["what is imported", "fresh interpreters", "median ms", "vs firestore"], rows)

    main_tops = _importtime(CASES["functions/smart_resume/main.py"])
    fs_tops = _importtime(CASES["import google.cloud.firestore"])
    extra = sorted(
        ((k, v - fs_tops.get(k, 0)) for k, v in main_tops.items()),
        key=lambda kv: -kv[1],
    )[:8]
    lines += [
        "",
        "heaviest packages smart_resume/main.py adds beyond firestore (-X importtime, self ms): "
        + ", ".join(f"{k} {v / 1000:.0f}" for k, v in extra if v > 0),
        "heavy optional SDKs imported by main.py: "
        + (", ".join(h for h in HEAVY if h in main_tops) or "none"),
    ]
    framework = medians["import functions_framework + firestore"]
    verdicts = []
    for name in ("functions/smart_resume/main.py", "functions/smart_resume_status/main.py"):
        ratio = medians[name] / base
        own = (medians[name] - framework) * 1000
        verdicts.append(
            E.verdict(
                f"{name} <= 1.3x firestore",
                ratio <= 1.3,
                f"{ratio:.2f}x; of which functions_framework (flask, werkzeug, jinja2, click: "
                f"loaded by the runtime before main.py) {framework / base:.2f}x, "
                f"main.py's own imports +{own:.0f} ms ({medians[name] / framework:.2f}x of "
                "framework + firestore)",
            )
        )
    E.report("2. Cold start (import time)", lines, verdicts)
    return {k: v * 1000 for k, v in medians.items()}


if __name__ == "__main__":
    run()
