"""What the benchmark scripts share: where the datasets are, their loaders, the local server helpers, and
how a run's result is written down.

Every script prints exactly one JSON line of results on stdout (progress goes to stderr) and, unless
--no-results, also writes it to bench/results/<name>.json with what is needed to read it later: the exact
command, the date, the commit (marked +dirty when src/ or bench/ had uncommitted changes) and the machine.
Scripts run as `python bench/X.py`, so this module is importable as `_common` from the script's folder.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

# As the `tuneloop` command does for its process (these scripts are programs too; torch loads after this):
# weights only from installed packages, and OpenMP threads that wait passively instead of spinning, which
# slowed training ~7x whenever another process shared the 2 cores.
for _variable, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("OMP_WAIT_POLICY", "PASSIVE")):
    os.environ.setdefault(_variable, _value)

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
# The benchmark datasets are never copied into the repository: TUNELOOP_DATASETS, or ../shared/datasets beside it.
DATASETS = Path(os.environ.get("TUNELOOP_DATASETS", ROOT.parent / "shared" / "datasets"))
# Public repositories some benchmarks read test data from, each a git snapshot or clone in a folder named
# owner+name: TUNELOOP_SOURCES, or ../.mirror beside the repository. Read at a pinned commit, never copied here.
SOURCES = Path(os.environ.get("TUNELOOP_SOURCES", ROOT.parent / ".mirror"))
# CPU features that decide how fast training and inference run here (bf16 autocast needs avx512_bf16 or AMX).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
RESULT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


# --- datasets ----------------------------------------------------------------------------------------


def dataset_file(*parts: str) -> Path:
    """A file of the benchmark datasets; exits with a message saying where they are looked for if missing."""
    path = DATASETS.joinpath(*parts)
    if not path.is_file():
        raise SystemExit(
            f"dataset file not found: {path}\n"
            f"The benchmarks read their datasets from {DATASETS} (banking77/, sst2/, waimai_10k/, and hwu64/, "
            f"which bench/prepare_hwu64.py writes); set TUNELOOP_DATASETS to the folder that holds them."
        )
    return path


def source_file(repository: str, revision: str, path: str) -> bytes:
    """A file of a public repository at a pinned commit, read from its snapshot under SOURCES; exits with a
    message saying how to get the snapshot if it is missing."""
    folder = SOURCES / repository.replace("/", "+")
    for git_dir in (folder / "repo" / ".git", folder / "repo", folder / ".git", folder):
        shown = subprocess.run(
            ["git", f"--git-dir={git_dir}", "show", f"{revision}:{path}"], capture_output=True, check=False
        )
        if shown.returncode == 0:
            return shown.stdout
    raise SystemExit(
        f"{path} of {repository} at {revision[:12]} not found under {folder}\n"
        f"Clone https://github.com/{repository} into {folder} (it needs that commit), "
        f"or set TUNELOOP_SOURCES to the folder that holds owner+name clones."
    )


def load_banking77() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Banking77's official (train, test) splits, columns text and label (the intent)."""
    train, test = (
        pd.read_csv(dataset_file("banking77", f"{split}.csv")).rename(columns={"category": "label"})
        for split in ("train", "test")
    )
    return train, test


def load_hwu64() -> tuple[pd.DataFrame, pd.DataFrame]:
    """HWU64's (train, test) splits (its first cross-validation fold), columns text and label (scenario_intent)."""
    train, test = (pd.read_csv(dataset_file("hwu64", f"{split}.csv"), dtype=str) for split in ("train", "test"))
    return train, test


INTENT_DATASETS = {"banking77": load_banking77, "hwu64": load_hwu64}


def held_out_options(parser: argparse.ArgumentParser) -> None:
    """The options of the benchmarks that hold intents out as out of scope (assistant_eval, oos_scores,
    scope_loop)."""
    parser.add_argument("--dataset", choices=sorted(INTENT_DATASETS), default="banking77")
    parser.add_argument("--held-out", type=int, default=10, help="Intents held out as out of scope.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-limit", type=int, default=None, help="Train on this many rows (smoke runs).")
    parser.add_argument("--home", type=Path, default=None, help="Registry home to train in, or reuse models from.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="tuneloop recipe override.")


@dataclass
class HeldOutSplit:
    """An intent dataset with `--held-out` of its intents (drawn by `--seed`) playing the unseen, out-of-scope
    ones: the split bench/assistant_eval.py, bench/oos_scores.py and bench/scope_loop.py share."""

    train: pd.DataFrame
    test: pd.DataFrame
    held_out: list[str]
    known_train: pd.DataFrame  # what the intent model trains on (cut to --train-limit rows for smoke runs)

    @property
    def unseen_train(self) -> pd.DataFrame:
        return self.train[self.train["label"].isin(self.held_out)]

    @classmethod
    def of(cls, args: argparse.Namespace) -> HeldOutSplit:
        train, test = INTENT_DATASETS[args.dataset]()
        intents = sorted(train["label"].unique())
        held_out = sorted(np.random.default_rng(args.seed).choice(intents, size=args.held_out, replace=False).tolist())
        known = train[~train["label"].isin(held_out)]
        if args.train_limit:
            known = known.groupby("label").head(max(2, args.train_limit // known["label"].nunique()))
        return cls(train, test, held_out, known)


def trained_once(home: Path, name: str, rows: pd.DataFrame, label: str, overrides: list[str]) -> tuple[str, bool]:
    """`name`@production in `home`, trained on `rows` with `overrides` unless an earlier run with the same rows
    and overrides left it there (benchmarks that share a model train it once); returns (ref, reused)."""
    import hashlib

    from tuneloop.config import load_config
    from tuneloop.registry import Registry
    from tuneloop.training import classification

    inputs = hashlib.sha256(
        (rows.to_csv(index=False) + "\0" + label + "\0" + "\0".join(overrides)).encode()
    ).hexdigest()
    marker = home / f"bench-{name}.inputs"
    registry_overrides = [f"registry.home={home}", *overrides]
    if marker.is_file() and marker.read_text() == inputs:
        return Registry(load_config(None, registry_overrides).registry).get(f"{name}@production").ref, True
    home.mkdir(parents=True, exist_ok=True)
    data = home / f"bench-{name}.csv"
    rows.to_csv(data, index=False)
    recipe = load_config(None, [f"data.path={data}", f"data.label_column={label}", f"name={name}", *registry_overrides])
    ref = classification.run(recipe, show_progress=False).version.ref
    Registry(recipe.registry).promote(ref)
    marker.write_text(inputs)
    return ref, False


def load_sst2() -> tuple[pd.DataFrame, pd.DataFrame]:
    """SST-2's (train, dev) phrases, columns label and text; the dev set serves as the test set."""
    train, dev = (
        pd.read_csv(dataset_file("sst2", name), sep="\t", quoting=3).rename(columns={"sentence": "text"})
        for name in ("train.tsv", "dev.tsv")
    )
    return train, dev


def load_waimai() -> pd.DataFrame:
    """All of waimai_10k (no split is given), columns text and label as strings."""
    frame = pd.read_csv(dataset_file("waimai_10k", "waimai_10k.csv")).rename(columns={"review": "text"})
    return frame[["text", "label"]].astype(str)


# The product categories of online_shopping_10_cats with the longest reviews (books, phones, computers): a Chinese
# sentiment set where a third of the texts is longer than 128 tokens. Its hotel reviews are never used (ChnSentiCorp's
# hotel set, from the same source, is kept aside for acceptance).
LONG_REVIEW_CATEGORIES = ("书籍", "手机", "计算机")


def load_online_shopping_long() -> pd.DataFrame:
    """The reviews of LONG_REVIEW_CATEGORIES in online_shopping_10_cats, columns text and label (1 = positive)."""
    frame = pd.read_csv(dataset_file("online_shopping_10_cats", "online_shopping_10_cats.csv"))
    frame = frame[frame["cat"].isin(LONG_REVIEW_CATEGORIES)].rename(columns={"review": "text"})
    return frame[["text", "label"]].dropna().astype(str)


# --- a local server ----------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Runs a command and prints its peak resident memory (KiB on Linux) — that of the largest process it started, a
# torchrun's ranks included — so that each run's own figure is measured, whatever ran before it.
_PEAK_OF = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:], stdout=sys.stderr).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
)


def run_with_peak_memory(command: list[str], env: dict[str, str] | None = None) -> float:
    """Run `command` (its output on stderr, so stdout stays the result line) and return its peak memory, MiB."""
    finished = subprocess.run(
        [sys.executable, "-c", _PEAK_OF, *command], check=True, stdout=subprocess.PIPE, text=True, env=env
    )
    return round(int(finished.stdout.strip().splitlines()[-1]) / 1024, 1)


def serve_process(port: int, settings: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """`tuneloop serve` on 127.0.0.1:`port` with these settings; its output goes to stderr, so stdout carries
    only the result line."""
    command = [sys.executable, "-m", "tuneloop", "serve", "--port", str(port), *settings]
    return subprocess.Popen(command, stdout=sys.stderr, env=env)


def wait_ready(url: str, process: subprocess.Popen, seconds: float = 300, interval: float = 0.5) -> None:
    """Until `tuneloop serve` at `url` answers /readyz; exits if the server dies or takes too long."""
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(interval)
    raise SystemExit(f"server at {url} not ready after {seconds}s")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)  # a clean shutdown: the prediction log is flushed
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- where and how it ran ----------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """The machine the figures come from: cores, CPU model and flags, memory, and the library versions."""
    model, flags, memory = None, set(), None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model is None:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = round(int(line.split()[1]) / 2**20, 1)  # kB → GiB
                break
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": model or platform.processor() or None,
        "flags": {flag: flag in flags for flag in CPU_FLAGS},
        "memory_gib": memory,
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "onnxruntime": _version("onnxruntime"),
    }


def commit() -> str:
    """The repository's short HEAD, +dirty when src/ or bench/ has uncommitted changes (results written by
    other runs do not count); unknown outside git."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "src", "bench", ":(exclude)bench/results")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


# --- results -----------------------------------------------------------------------------------------


# Read when the script starts: the code that ran, even if the tree changes during a long run.
STARTED_ON = commit()


def _plain(value: Any) -> Any:
    """JSON for what the reports hold besides plain types: numpy scalars and arrays, paths."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _script() -> Path:
    main = sys.modules.get("__main__")
    return Path(getattr(main, "__file__", None) or sys.argv[0])


def result_name(value: str) -> str:
    """argparse type of --results-name: the name becomes a file name under bench/results/."""
    if not RESULT_NAME.fullmatch(value):
        raise argparse.ArgumentTypeError(f"'{value}' must be letters, digits and . _ + - (it names a file)")
    return value


def result_at_commit(revision: str, script: str, arguments: list[str]) -> dict[str, Any]:
    """The result line of `python bench/SCRIPT ARGUMENTS` run with the code of `revision` (a git commit, checked
    out into a temporary worktree and importing its own src/): the before of a before-and-after comparison, in
    the same run on the same machine as the after."""
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{revision}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if commit.returncode:
        raise SystemExit(f"--against {revision}: not a commit of this repository")
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), commit.stdout.strip()],
            check=True,
            capture_output=True,
        )
        try:
            env = {**os.environ, "PYTHONPATH": str(tree / "src"), "TUNELOOP_DATASETS": str(DATASETS)}
            done = subprocess.run(
                [sys.executable, str(tree / "bench" / script), *arguments, "--no-results"],
                cwd=tree,
                env=env,
                stdout=subprocess.PIPE,
                text=True,
                check=True,
            )
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"commit": commit.stdout.strip()[:12], "result": result}


def add_result_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--results-name",
        type=result_name,
        default=None,
        help="Write bench/results/NAME.json instead of the variant's default name.",
    )
    parser.add_argument(
        "--no-results", action="store_true", help="Only print the result line; write no file (smoke runs)."
    )


def print_result(result: dict[str, Any]) -> None:
    """The one JSON line of results on stdout."""
    print(json.dumps(result, default=_plain, ensure_ascii=False), flush=True)


def write_result(name: str, result: dict[str, Any], argv: list[str]) -> Path:
    """Print the result line, and write it with how it was made to bench/results/<name>.json (atomically)."""
    print_result(result)
    script = _script()
    record = {
        "benchmark": script.stem,
        "name": name,
        "command": " ".join(["python", f"bench/{script.name}", shlex.join(argv)]).rstrip(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": STARTED_ON,
        "machine": machine(),
        "result": result,
    }
    text = json.dumps(record, default=_plain, ensure_ascii=False, indent=2) + "\n"
    if not RESULT_NAME.fullmatch(name):
        raise ValueError(f"result name '{name}' must be letters, digits and . _ + - (it names a file)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    target = RESULTS / f"{name}.json"
    handle, temporary = tempfile.mkstemp(dir=RESULTS, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide the result from other readers (docs build)
        os.replace(temporary, target)  # a reader sees the old file or the new one, never half of one
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    print(f"result written to {target}", file=sys.stderr)
    return target


def publish(args: argparse.Namespace, name: str, result: dict[str, Any]) -> Path | None:
    """The end of every script: the result line on stdout and, unless --no-results, its file."""
    if args.no_results:
        print_result(result)
        return None
    return write_result(args.results_name or name, result, sys.argv[1:])
