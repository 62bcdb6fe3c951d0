"""``RunDir``: the one owner of a training run's folder. No other module spells a run path.

::

    runs/<spec name>/<YYYYmmdd-HHMMSS>/
        run.json            name, creation time, command, overrides, status and summary
        spec.yaml           the resolved spec (vocab_size filled in): what the run *is*
        plugins.json        which distribution provided each non-built-in component
        tokenizer/          the fitted tokenizer
        checkpoints/        see gptkit.store.checkpoint
        metrics.jsonl       one JSON object per logged step
        samples.txt         text sampled at each evaluation
        loss_curve.png      train and validation loss
        mlflow.json         tracking URI and run id, so a resume reopens the same MLflow run
        mlflow-spool.jsonl  MLflow events not sent yet (see gptkit.training.tracking)
        .lock               the pid of the process writing the run (one writer at a time)

A run's newest-ness is its creation time (``run.json``), never its folder name.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from gptkit.errors import RunError
from gptkit.safeio import entries, escape_controls, finite_number, read_bytes, read_json

if TYPE_CHECKING:
    from gptkit.spec.models import ExperimentSpec

RUNS_ROOT = Path("runs")
SPEC_FILE = "spec.yaml"
RUN_FILE = "run.json"
MAX_RUN_FILE = 16 << 20  # run.json, plugins.json, mlflow.json: small documents
MAX_METRICS = 512 << 20  # metrics.jsonl: one line per logged step
MAX_PID = 1 << 22  # Linux's pid_max ceiling; a larger number in .lock is not a pid


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file; lines cut short by a crash, or that are not
    objects, are skipped."""
    rows: list[dict[str, Any]] = []
    try:  # a FIFO or /dev/zero in its place is refused, never read
        text = read_bytes(path, path.name, MAX_METRICS, RunError).decode("utf-8", "replace")
    except RunError:
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def dump_yaml(data: Any, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def short_override(text: str) -> str:
    """``model.positional.kind="rope"`` -> ``positional=rope``;
    ``train.lr=0.003`` -> ``lr=0.003``."""
    key, _, value = text.partition("=")
    parts = key.strip().split(".")
    short = parts[-2] if parts[-1] == "kind" and len(parts) > 1 else parts[-1]
    return f"{short}={value.strip().strip(chr(34)).strip(chr(39))}"


def default_run_name(spec_name: str, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """A readable run name: the spec's name and what the command line changed."""
    return " ".join([spec_name, *(short_override(o) for o in overrides)])[:250]


def _is_dir(path: Path) -> bool:
    """A folder we can look into; False for anything unreadable (``/proc/1/cwd`` to a user
    without the right: ``is_dir`` raises PermissionError there)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _is_time(value: Any) -> bool:
    """A creation time: a finite number of seconds since 1970, before the year 10000."""
    number = finite_number(value)
    return number is not None and 0 <= number < 253_402_300_800


@dataclass(frozen=True)
class RunDir:
    """A run folder and everything in it, by name. Create with ``new``/``create``, find with
    ``latest``/``resolve``, open a finished one with ``load``."""

    path: Path

    # ------------------------------------------------------------------ the layout

    @property
    def spec_file(self) -> Path:
        return self.path / SPEC_FILE

    @property
    def run_file(self) -> Path:
        return self.path / RUN_FILE

    @property
    def plugins_file(self) -> Path:
        return self.path / "plugins.json"

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def samples_file(self) -> Path:
        return self.path / "samples.txt"

    @property
    def loss_plot(self) -> Path:
        return self.path / "loss_curve.png"

    @property
    def mlflow_file(self) -> Path:
        return self.path / "mlflow.json"

    @property
    def spool_file(self) -> Path:
        return self.path / "mlflow-spool.jsonl"

    @property
    def lock_file(self) -> Path:
        return self.path / ".lock"

    @property
    def default_bundle(self) -> Path:
        """Where ``export: {onnx: true}`` writes the bundle after training."""
        return self.path / "bundle"

    def artifacts(self) -> list[Path]:
        """Files worth attaching to the MLflow run at the end."""
        files = [
            self.spec_file,
            self.run_file,
            self.plugins_file,
            self.metrics_file,
            self.samples_file,
            self.loss_plot,
        ]
        return [f for f in files if f.exists()]

    def __str__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------ finding runs

    @classmethod
    def new(cls, spec_name: str, root: Path = RUNS_ROOT) -> RunDir:
        """A fresh folder name ``runs/<spec name>/<time>`` (not created yet)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path, n = root / spec_name / stamp, 1
        while path.exists():
            n += 1
            path = root / spec_name / f"{stamp}-{n}"
        return cls(path)

    @classmethod
    def new_sweep(cls, spec_name: str, root: Path = RUNS_ROOT) -> Path:
        """A fresh folder for a sweep's runs: ``runs/<spec name>/sweep-<time>``."""
        return root / spec_name / time.strftime("sweep-%Y%m%d-%H%M%S")

    @classmethod
    def sweep_point(cls, sweep_root: Path, index: int, name: str) -> RunDir:
        """The run folder of one grid point inside a sweep folder."""
        slug = "".join(c if c.isalnum() or c in ".-" else "-" for c in name.replace("=", "-"))
        return cls(sweep_root / f"{index:02d}-{slug}"[:120])

    @staticmethod
    def sweep_file(sweep_root: Path) -> Path:
        return sweep_root / "sweep.json"

    def is_run(self) -> bool:
        try:
            return self.spec_file.is_file()
        except OSError:  # a folder this user may not look into
            return False

    def created(self) -> float:
        """Creation time (run.json; for older runs, the spec file's modification time)."""
        created = self.info().get("created")
        if isinstance(created, (int, float)) and _is_time(created):
            return float(created)
        try:
            return self.spec_file.stat().st_mtime
        except OSError:
            return 0.0

    @classmethod
    def find(cls, folder: Path, depth: int = 3) -> Iterator[RunDir]:
        """Every run in ``folder`` (itself included), down to ``depth`` levels (sweeps nest)."""
        run = cls(folder)
        if run.is_run():
            yield run
            return
        if depth <= 0 or not _is_dir(folder):
            return
        try:
            children = sorted(folder.iterdir())
        except OSError:  # a folder this user may not list: it holds no run of theirs
            return
        for child in children:
            if not child.name.startswith(".") and _is_dir(child):
                yield from cls.find(child, depth - 1)

    @classmethod
    def latest(cls, folder: Path) -> RunDir | None:
        """The newest run (by creation time) in ``folder`` or below it."""
        runs = list(cls.find(folder))
        return max(runs, key=lambda r: r.created()) if runs else None

    @classmethod
    def resolve(cls, run: str | Path, announce: bool = True) -> RunDir:
        """A run directory, or a folder of runs (``runs/<name>``, a sweep): its newest run.
        Prints which run it picked when it had to choose."""
        path = Path(run)
        if not path.exists():
            raise RunError(f"run not found: {path}", "List your runs with: gptkit runs")
        if not path.is_dir():
            raise RunError(
                f"{path} is a file; expected a run folder (or an export bundle's folder, for "
                "the commands that take one)"
            )
        found = cls(path)
        if found.is_run():
            return found
        newest = cls.latest(path)
        if newest is None:
            raise RunError(
                f"{path} is not a gptkit run directory (no {SPEC_FILE}) and holds no runs",
                "Pass a folder made by 'gptkit train' (runs/<name>/<time>/), runs/<name> for its "
                "newest run, or an export bundle. List runs with: gptkit runs",
            )
        if announce:
            print(
                f"gptkit: using {newest.path} (newest run in {path}: "
                f"{escape_controls(str(newest.info().get('name') or newest.path.name))})",
                file=sys.stderr,
            )
        return newest

    # ------------------------------------------------------------------ files of the run

    def info(self) -> dict[str, Any]:
        """run.json (empty for runs made before it existed, or when it cannot be read)."""
        try:
            return self.read_info()
        except RunError:
            return {}

    def read_info(self) -> dict[str, Any]:
        """run.json, checked: a regular file of bounded size holding an object whose ``name``
        is a string and ``created`` a plausible time. Empty when there is none (older runs);
        :class:`RunError` naming the problem otherwise."""
        if not os.path.lexists(self.run_file):
            return {}
        data = read_json(self.run_file, "run file", MAX_RUN_FILE, RunError)
        if not isinstance(data, dict):
            raise RunError(f"run file {self.run_file} holds {type(data).__name__}, not an object")
        if "name" in data and not isinstance(data["name"], str):
            raise RunError(f"run file {self.run_file}: name is not a string")
        if "created" in data and not _is_time(data["created"]):
            raise RunError(f"run file {self.run_file}: created is not a time ({data['created']})")
        return data

    def update_info(self, **fields: Any) -> None:
        atomic_write_text(self.run_file, json.dumps({**self.info(), **fields}, indent=2))

    def read_spec(self, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentSpec:
        """The run's resolved spec (``overrides`` applied on top)."""
        from gptkit.spec.files import read_spec_file
        from gptkit.spec.validate import validate_spec

        if not self.spec_file.is_file():
            raise RunError(
                f"{self.path} is not a gptkit run directory (no {SPEC_FILE})",
                "Pass a folder made by 'gptkit train' (runs/<name>/<time>/) or an export bundle.",
            )
        # Issue 14/18: import only trusted plugin modules; name the package of a missing kind.
        return validate_spec(
            read_spec_file(self.spec_file),
            str(self.spec_file),
            overrides,
            opened=True,
            provenance=self.recorded_plugins(),
        )

    def write_spec(self, spec: ExperimentSpec) -> None:
        dump_yaml(spec.to_dict(), self.spec_file)

    def recorded_plugins(self) -> dict[str, Any]:
        if not os.path.lexists(self.plugins_file):
            return {}
        try:
            data = read_json(self.plugins_file, "plugins file", MAX_RUN_FILE, RunError)
        except RunError:
            return {}
        return data if isinstance(data, dict) else {}

    def metrics(self) -> list[dict[str, Any]]:
        """The logged rows; a row whose step is not an integer (edited by hand) is
        skipped, as a line cut short is."""
        rows = read_jsonl(self.metrics_file)
        return [r for r in rows if type(r.get("step", 0)) is int]

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Drop log lines past ``step``: a resumed run writes them again."""
        if self.metrics_file.exists():
            rows = [r for r in self.metrics() if r.get("step", step + 1) <= step]
            atomic_write_text(self.metrics_file, "".join(json.dumps(r) + "\n" for r in rows))

    def append_sample(self, step: int, text: str) -> None:
        with open(self.samples_file, "a", encoding="utf-8") as f:
            f.write(f"--- step {step} ---\n{text}\n")

    # ------------------------------------------------------------------ ownership

    def check_writable_target(self) -> None:
        """Refuse to train into an existing folder that is not a gptkit run: its files are
        the user's, not ours."""
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"--run-dir {self.path} is a file, not a folder")
        self._refuse_live_writer()  # first: a run being started there has no spec.yaml yet
        if self.path.is_dir() and not self.is_run() and any(self.path.iterdir()):
            raise RunError(
                f"{self.path} exists and is not a gptkit run (no {SPEC_FILE}); refusing to write "
                "into it",
                "Choose a new or empty --run-dir.",
            )

    def lock(self) -> None:
        """Become the run's one writer, or refuse. A lock left by a dead process is taken over
        (and said so)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunError(
                f"cannot make the run folder {self.path}: {exc.strerror or exc}"
            ) from None
        for _ in range(2):
            try:
                fd = os.open(self.lock_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_dead_lock()
                continue
            except OSError as exc:  # a read-only or full disk, no permission
                raise self._cannot_lock(exc) from None
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(f"{os.getpid()}\n")
            except OSError as exc:
                self.lock_file.unlink(missing_ok=True)  # no empty lock left behind
                raise self._cannot_lock(exc) from None
            try:
                self._refuse_links()
            except RunError:
                self.unlock()
                raise
            return
        raise RunError(f"could not take the lock {self.lock_file}")

    def _refuse_live_writer(self) -> None:
        """Refuse a folder whose lock a live process (not this one) holds."""
        owner = self._lock_owner()
        if owner is not None and _pid_alive(owner) and owner != os.getpid():
            raise RunError(
                f"{self.path} is being written by another gptkit process (pid {owner})",
                f"Wait for it to finish, or stop it; if pid {owner} is not gptkit, "
                f"remove {self.lock_file}.",
            )

    def _take_over_dead_lock(self) -> None:
        """Refuse a lock held by a live process; remove one left by a dead one (and say so)."""
        self._refuse_live_writer()
        owner = self._lock_owner()
        print(
            f"gptkit: note: {self.lock_file} was left by a process that is gone "
            f"(pid {owner}); taking over",
            file=sys.stderr,
        )
        try:
            self.lock_file.unlink(missing_ok=True)
        except OSError as exc:
            raise self._cannot_lock(exc) from None

    def _refuse_links(self) -> None:
        """Refuse a folder holding symbolic links: training appends to, rewrites and prunes
        the run's files, and through a link it would do so to files elsewhere (a
        ``loss_curve.png`` linked to ``~/.bashrc``, a ``checkpoints`` linked to another run's)."""
        links = [rel for rel, mode in entries(self.path, RunError) if stat.S_ISLNK(mode)]
        if links:
            shown = ", ".join(
                f"{link} -> {os.readlink(self.path / link)}" for link in sorted(links)[:3]
            )
            more = f" (and {len(links) - 3} more)" if len(links) > 3 else ""
            raise RunError(
                f"{self.path} holds symbolic links: {shown}{more}; gptkit writes and prunes a "
                "run's own files only, never through a link",
                "Replace each link by the file itself, or train into a new --run-dir.",
            )

    def _cannot_lock(self, exc: OSError) -> RunError:
        return RunError(
            f"cannot write in the run folder {self.path} (taking its lock {self.lock_file.name}): "
            f"{exc.strerror or exc}",
            "Free space on its disk, or make the folder writable (a read-only copy of a run "
            "can still be used by generate, eval and export).",
        )

    def _lock_owner(self) -> int | None:
        """The pid in ``.lock``; None when there is none (or a writer died mid-write). A lock
        that is not a regular file, or holds no possible pid, is refused (:class:`RunError`):
        it is not gptkit's, so it is left for the user to look at."""
        if not os.path.lexists(self.lock_file):
            return None
        hint = "If no gptkit process is writing this run, remove it."
        try:
            text = read_bytes(self.lock_file, "lock file", 64, RunError).decode("ascii")
        except (RunError, UnicodeDecodeError) as exc:
            reason = str(exc) if isinstance(exc, RunError) else f"lock file {self.lock_file}"
            raise RunError(f"{reason} (not a gptkit lock)", hint) from None
        try:
            pid = int(text.split()[0])
        except (ValueError, IndexError):
            return None
        if not 0 < pid < MAX_PID:
            raise RunError(f"lock file {self.lock_file} holds {pid}, which is not a pid", hint)
        return pid

    def unlock(self) -> None:
        try:
            owner = self._lock_owner()
        except RunError:  # replaced by something else: not ours to remove
            return
        if owner == os.getpid():
            self.lock_file.unlink(missing_ok=True)

    def writer_pid(self) -> int | None:
        """The pid of a live process writing the run, if any."""
        owner = self._lock_owner()
        return owner if owner is not None and _pid_alive(owner) else None

    # ------------------------------------------------------------------ opening a run

    def load(
        self,
        checkpoint: str = "latest",
        overrides: list[str] | tuple[str, ...] = (),
        device: str = "cpu",
    ) -> LoadedRun:
        """The run's spec, tokenizer and model weights (``checkpoint``: latest, best, step-N)."""
        from gptkit.components.tokenizers import load_tokenizer, vocabulary_misfit
        from gptkit.model import GPT
        from gptkit.store.checkpoint import checkpoint_candidates, load_checkpoint

        spec = self.read_spec(overrides)
        if spec.model.vocab_size is None:
            raise RunError(
                f"{self.spec_file} has no model.vocab_size: it is not the resolved "
                "spec that 'gptkit train' writes (was it replaced by hand?)"
            )
        tokenizer = load_tokenizer(self.tokenizer_dir, spec_class=type(spec.tokenizer))
        misfit = vocabulary_misfit(tokenizer, spec.model.vocab_size)
        if misfit:
            raise RunError(
                f"run {self.path}: {misfit}; they do not belong together",
                "Was its tokenizer folder or spec.yaml replaced? Open the run as it was trained.",
            )
        candidates = checkpoint_candidates(self.checkpoints, checkpoint)
        if not candidates:
            raise RunError(f"run {self.path} has no checkpoint yet", "Train it: gptkit train SPEC")
        model = GPT(spec.model)
        errors = []
        for path in candidates:
            try:
                load_checkpoint(path, model)
            except RunError as exc:
                errors.append(str(exc))
                continue
            for error in errors:  # as a resume says it: these weights are not the ones asked for
                print(f"gptkit: warning: skipping unusable checkpoint: {error}", file=sys.stderr)
            if errors:
                print(f"gptkit: using {path.name} instead", file=sys.stderr)
            return LoadedRun(self, spec, model.to(device).eval(), tokenizer, path)
        more = f" (and {len(errors) - 1} older checkpoint(s) failed too)" if len(errors) > 1 else ""
        raise RunError(f"no usable checkpoint in {self.checkpoints}: {errors[0]}{more}")


@dataclass
class LoadedRun:
    """A run opened for use: its spec, model (eval mode) and tokenizer."""

    run: RunDir
    spec: Any
    model: Any
    tokenizer: Any
    checkpoint: Path

    @property
    def run_dir(self) -> Path:
        return self.run.path


def load_run(
    run: str | Path,
    checkpoint: str = "latest",
    overrides: list[str] | tuple[str, ...] = (),
    device: str = "cpu",
) -> LoadedRun:
    """Open a run directory (or ``runs/<name>``: its newest run) for generation or export."""
    return RunDir.resolve(run).load(checkpoint, overrides, device)
