"""MLflow tracking that never stops training.

Every call only puts an event on a queue. A background thread sends events to MLflow in order;
when the store or server fails it warns once, keeps the events (and mirrors them to
``mlflow-spool.jsonl`` in the run directory), and retries with a growing delay. What could not
be sent by the end stays in the spool and is sent first the next time the run is resumed.

An event MLflow refuses for good (a malformed value, a damaged spool line) is set aside in
``mlflow-spool.jsonl.rejected`` and reported once: one bad event never blocks the rest.
The run's start and end times are the training's own, passed explicitly, so the duration MLflow
shows is the real one however late the store answers.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from gptkit.errors import GptkitError

DEFAULT_URI = "sqlite:///mlflow.db"
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the UI opens on runs
OPS = {"params", "tags", "metrics", "artifact", "dataset", "reopen", "end"}
REQUEST_TIMEOUT_S = 10  # one MLflow HTTP request (MLFLOW_HTTP_REQUEST_TIMEOUT, unless set)
END_RETRY_S = 1.0  # at a run's end, a server there but slow is tried again this soon
SLOW_SEND_EVENTS = 200  # a close() with more than this left to send says so
# MLflow error codes that no retry can fix: the event is set aside, the others go on.
PERMANENT = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE", "MALFORMED_REQUEST"}


def time_ms() -> int:
    return int(time.time() * 1000)


def quick_timeouts() -> None:
    """Fail fast against an unreachable server (commands other than training wait on it)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    quiet_urls()


def quiet_urls() -> None:
    """MLflow prints "View run ... at" to standard output when a run on a server ends (in
    the middle of gptkit's own output); gptkit prints the run's URL itself."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def ensure_experiment(client: Any, name: str) -> str:
    """The experiment's id (created as a model-training experiment if it does not exist)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, tags=EXPERIMENT_KIND)
    if "mlflow.experimentKind" not in (exp.tags or {}):
        client.set_experiment_tag(exp.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
    return exp.experiment_id


def ui_base(uri: str) -> str:
    """Where the MLflow UI for ``uri`` is: the server itself, or a local ``mlflow ui``."""
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return "http://127.0.0.1:5000"


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI, on its model-metrics (training curves) tab."""
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics"


def valid_event(event: Any) -> bool:
    """An event as this module writes it (a damaged spool line is not)."""
    if not isinstance(event, dict) or event.get("op") not in OPS:
        return False
    op = event["op"]
    if op == "metrics":
        return (
            isinstance(event.get("metrics"), dict)
            and isinstance(event.get("step"), int)
            and isinstance(event.get("ts"), int)
        )
    if op in ("params", "tags"):
        return isinstance(event.get(op), dict)
    if op == "artifact":
        return isinstance(event.get("path"), str)
    if op == "dataset":
        return isinstance(event.get("dataset"), dict)
    return True


def resolve_uri(spec_uri: str | None) -> str:
    """The tracking URI; a relative SQLite path is made absolute (runs are reopened from
    other working directories by resume and export)."""
    uri = spec_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + os.path.abspath(uri[len(prefix) :])
    store = sqlite_path(uri)
    if store is not None:
        check_sqlite_store(store)
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` tracking URI (None for a server or another store)."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix) :]) if uri.startswith(prefix) else None


def check_sqlite_store(path: Path) -> None:
    """Refuse a SQLite file that exists and is not an MLflow store (a run's spec, perhaps
    someone else's, may name any file): MLflow would add its tables to that database."""
    import sqlite3

    if not path.exists() or (path.is_file() and path.stat().st_size == 0):
        return  # a new store
    try:
        with open(path, "rb") as f:
            is_sqlite = f.read(16) == b"SQLite format 3\x00"
        tables: set[str] = set()
        if is_sqlite:
            db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
            try:
                rows = db.execute("SELECT name FROM sqlite_master WHERE type='table'")
                tables = {r[0] for r in rows}
            finally:
                db.close()
    except (OSError, sqlite3.Error) as exc:
        raise GptkitError(f"cannot read the MLflow store {path}: {exc}") from None
    # No table yet: a store another process is creating. Tables, none of MLflow's: not one.
    if not is_sqlite or (tables and not tables & {"experiments", "runs", "alembic_version"}):
        what = "a SQLite database of something else" if is_sqlite else "not a SQLite database"
        raise GptkitError(
            f"the tracking store {path} is {what}, not an MLflow store: MLflow would write its "
            "tables into it",
            "Name another file in tracking.uri (or $MLFLOW_TRACKING_URI), or a new one.",
        )


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """{'model': {'d_model': 8}} -> {'model.d_model': '8'} (MLflow params are strings)."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = json.dumps(data) if isinstance(data, (list, type(None))) else str(data)
    return out


# A param a resume changed (MLflow params cannot change): the tag PARAM_TAG + key.
PARAM_TAG = "gptkit.param."


def params_of(run: Any) -> dict[str, str]:
    """An MLflow run's params in force at its end: its params, with the ``PARAM_TAG`` tags
    of its resumes over them (``null``: no longer set)."""
    params = dict(run.data.params)
    for tag, value in run.data.tags.items():
        if tag.startswith(PARAM_TAG):
            params[tag[len(PARAM_TAG) :]] = value
    return {k: v for k, v in params.items() if v != "null"}


class Tracker:
    """Queue-backed MLflow logging for one run (created, or reopened by id on resume)."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_dir: Path,
        run_name: str,
        warn=None,
        retry_seconds: float = 2.0,
        parent_run_id: str | None = None,
        start_time: int | None = None,
        on_created=None,
    ) -> None:
        from gptkit.store.rundir import RunDir

        self.parent_run_id = parent_run_id
        self.start_time = start_time or time_ms()
        self.on_created = on_created or (lambda url: None)
        self.files = RunDir(Path(run_dir))
        self.uri = uri
        self.experiment = experiment
        self.run_dir = Path(run_dir)
        self.run_name = run_name
        self.warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
        self.retry_seconds = retry_seconds
        saved = self._read_run_file()
        self.run_id: str | None = saved.get("run_id") if saved.get("uri") == uri else None
        self.experiment_id: str | None = saved.get("experiment_id") if self.run_id else None
        self.rejected = 0
        self.spooled_end: dict[str, Any] | None = None  # the end an earlier process recorded
        self.pending: list[dict[str, Any]] = self._read_spool()
        self.failures = 0
        self.sent = 0  # events sent by this process (close() waits while it grows)
        self._lock = threading.Lock()  # pending and the spool file, between worker and close
        self._warned = False
        self._queue: queue.Queue = queue.Queue()
        self._client = None
        self._thread = threading.Thread(target=self._work, name="gptkit-mlflow", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public, non-blocking

    def log_params(self, params: dict[str, str]) -> None:
        self._put({"op": "params", "params": params})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._put({"op": "tags", "tags": tags})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._put(
            {"op": "metrics", "metrics": metrics, "step": step, "ts": int(time.time() * 1000)}
        )

    def reopen(self) -> None:
        """Mark a resumed run as running again."""
        self._put({"op": "reopen"})

    def log_dataset(self, dataset: dict[str, str]) -> None:
        """An MLflow dataset input: name, digest, source_type, source, profile."""
        self._put({"op": "dataset", "dataset": dataset})

    @property
    def url(self) -> str | None:
        if self.run_id and self.experiment_id:
            return run_url(self.uri, self.experiment_id, self.run_id)
        return None

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._put({"op": "artifact", "path": str(path), "artifact_path": artifact_path})

    def close(self, status: str = "FINISHED", timeout: float = 30.0, end: bool = True) -> int:
        """Finish the run now (``end``), or else send what waits, the end an earlier process
        spooled included (with its own time). Waits while events are being sent, and gives up
        after ``timeout`` s in which none was. Returns events left spooled."""
        if end:
            self._put({"op": "end", "status": status, "end_time": time_ms()})
        elif self.spooled_end is not None:
            self._put(self.spooled_end)
        self._queue.put(None)
        self._wait_for_sending(timeout)
        return self._write_spool()

    def _wait_for_sending(self, stall: float) -> None:
        """Join the worker while it makes progress (a slow server that takes every batch is
        waited for; one that takes none for ``stall`` s is not), saying so when it is long."""
        sent, since, said = self.sent, time.monotonic(), False
        while self._thread.is_alive():
            self._thread.join(0.25)
            if self.sent != sent:
                sent, since = self.sent, time.monotonic()
            elif time.monotonic() - since > stall:
                self._stop = True  # the request under way ends (sent or timed out), no other
                self._thread.join(_request_timeout() + 1)
                return
            if not said and self._thread.is_alive() and len(self.pending) > SLOW_SEND_EVENTS:
                self.warn(f"sending {len(self.pending)} MLflow events to {self.uri} ...")
                said = True

    # ------------------------------------------------------------------ worker

    _stop = False

    def _put(self, event: dict[str, Any]) -> None:
        self._queue.put(event)

    def _take(self, timeout: float | None) -> bool:
        """Move what was queued (waiting up to ``timeout`` for the first) into ``pending``;
        True once the end-of-queue mark has been taken."""
        done = False
        try:
            item = self._queue.get(timeout=timeout)
            while True:  # take everything already queued, then send
                if item is None:
                    done = True
                else:
                    self.pending.append(item)
                item = self._queue.get_nowait()
        except queue.Empty:
            pass
        return done

    def _work(self) -> None:
        retry_at = 0.0
        done = False
        while not (done and not self.pending) and not self._stop:
            timeout = max(0.05, retry_at - time.time()) if self.pending else None
            done = self._take(timeout) or done
            if time.time() < retry_at and not done:
                continue
            try:
                self._flush()
                if self._stop:
                    return  # close() gave up: what is left is spooled there
                self.failures = 0
                if self._warned:
                    self.warn(f"MLflow tracking at {self.uri} is back; spooled events sent")
                    self._warned = False
            except Exception as exc:
                self.failures += 1
                self._write_spool()
                self._warn_failed(exc)
                if done and not _there_but_slow(exc):
                    return  # the end: no server to wait for; what is left stays in the spool
                # at the end, a server that is there but slow (a timeout, a dropped
                # connection, a 5xx answer) is tried again soon; close() bounds how long
                wait = END_RETRY_S if done else self.retry_seconds * 2 ** min(self.failures, 4)
                retry_at = time.time() + min(30.0, wait)

    def _warn_failed(self, exc: Exception) -> None:
        if not self._warned:
            self.warn(
                f"MLflow tracking at {self.uri} failed ({type(exc).__name__}: "
                f"{_short(exc)}); training goes on, events are spooled in "
                f"{self.files.spool_file} and retried"
            )
            self._warned = True

    def _connect(self):
        if self._client is None:
            import logging

            from mlflow.tracking import MlflowClient

            for name in ("mlflow", "alembic"):
                logging.getLogger(name).setLevel(logging.WARNING)

            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(REQUEST_TIMEOUT_S))
            quiet_urls()
            self._client = MlflowClient(tracking_uri=self.uri)
        client = self._client
        if self.run_id is None:
            exp_id = ensure_experiment(client, self.experiment)
            tags = {"gptkit.run_dir": str(self.run_dir.resolve())}
            if self.parent_run_id:
                tags["mlflow.parentRunId"] = self.parent_run_id  # nests it under a sweep
            run = client.create_run(
                exp_id, start_time=self.start_time, run_name=self.run_name, tags=tags
            )
            self.run_id, self.experiment_id = run.info.run_id, exp_id
            self._write_run_file(
                {
                    "uri": self.uri,
                    "run_id": self.run_id,
                    "experiment_id": exp_id,
                    "experiment": self.experiment,
                }
            )
            self.on_created(self.url)
        return client

    def _flush(self) -> None:
        if not self.pending or self._stop:
            return
        client = self._connect()
        while self.pending and not self._stop:
            n = self._batchable()
            try:
                self._send(client, self.pending[:n])
            except Exception as exc:
                if not _permanent(exc):
                    raise
                self._reject(self.pending[:n], exc)
            with self._lock:
                del self.pending[:n]
                self.sent += n
        self._write_spool()

    def _batchable(self) -> int:
        """How many events from the head go in one request (consecutive metrics, <= 900)."""
        if self.pending[0]["op"] != "metrics":
            return 1
        n = values = 0
        while n < len(self.pending) and self.pending[n]["op"] == "metrics" and values < 900:
            values += len(self.pending[n]["metrics"])
            n += 1
        return n

    def _send(self, client: Any, events: list[dict[str, Any]]) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag

        event, op = events[0], events[0]["op"]
        if op == "metrics":
            batch = [
                Metric(k, float(v), e["ts"], e["step"])
                for e in events
                for k, v in e["metrics"].items()
            ]
            client.log_batch(self.run_id, metrics=batch)
        elif op == "params":
            items = [Param(str(k)[:250], str(v)[:6000]) for k, v in event["params"].items()]
            for i in range(0, len(items), 100):
                client.log_batch(self.run_id, params=items[i : i + 100])
        elif op == "tags":
            client.log_batch(
                self.run_id, tags=[RunTag(str(k), str(v)[:5000]) for k, v in event["tags"].items()]
            )
        elif op == "dataset":
            d = event["dataset"]
            dataset = Dataset(
                d["name"], d["digest"], d["source_type"], d["source"], profile=d.get("profile")
            )
            tag = InputTag("mlflow.data.context", d.get("context", "training"))
            client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, tags=[tag])])
        elif op == "artifact":
            path = Path(event["path"])
            if path.is_dir():
                client.log_artifacts(self.run_id, str(path), event.get("artifact_path"))
            elif path.exists():
                client.log_artifact(self.run_id, str(path), event.get("artifact_path"))
        elif op == "end":
            client.set_terminated(
                self.run_id, status=event["status"], end_time=event.get("end_time")
            )
        elif op == "reopen":
            client.update_run(self.run_id, status="RUNNING")

    def _reject(self, events: list[dict[str, Any]], reason: Any) -> None:
        """Set events aside for good (kept for a human in the ``.rejected`` file)."""
        path = self.files.spool_file.with_name(self.files.spool_file.name + ".rejected")
        with open(path, "a", encoding="utf-8") as f:
            for e in events:
                f.write(json.dumps({"event": e, "reason": str(reason)[:300]}, default=str) + "\n")
        if not self.rejected:
            self.warn(
                f"MLflow refused an event for good ({str(reason)[:200]}); it is kept in "
                f"{path} and the others go on"
            )
        self.rejected += len(events)

    # ------------------------------------------------------------------ files

    def _read_run_file(self) -> dict[str, Any]:
        return read_mlflow_link(self.files)

    def _write_run_file(self, data: dict[str, Any]) -> None:
        from gptkit.store.rundir import atomic_write_text

        atomic_write_text(self.files.mlflow_file, json.dumps(data, indent=2))

    def _read_spool(self) -> list[dict[str, Any]]:
        """Events left by an earlier process; damaged lines are set aside, not fatal."""
        events, bad = [], []
        from gptkit.errors import RunError
        from gptkit.safeio import read_bytes
        from gptkit.store.rundir import MAX_METRICS

        if not self.files.spool_file.exists():
            return []
        try:  # bounded, regular files only: a FIFO or /dev/zero is not waited on
            raw = read_bytes(self.files.spool_file, "MLflow spool", MAX_METRICS, RunError)
        except RunError:
            return []
        lines = raw.decode("utf-8", "replace").splitlines()
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                event = line
            if valid_event(event):
                if event["op"] != "end":  # this process ends the run itself (close)
                    events.append(event)
                else:
                    self.spooled_end = event
            elif line.strip():
                bad.append(event)
        if bad:
            self._reject(bad, "damaged spool line")
        return events

    def _write_spool(self) -> int:
        """The spool file holds what is pending (none: no file); returns how many events."""
        from gptkit.store.rundir import atomic_write_text

        path = self.files.spool_file
        with self._lock:  # the worker and close() both write it
            if not self.pending:
                path.unlink(missing_ok=True)
                return 0
            atomic_write_text(path, "".join(json.dumps(e) + "\n" for e in self.pending))
            return len(self.pending)


def read_mlflow_link(run) -> dict[str, Any]:
    """A run's ``mlflow.json`` (uri, run_id, experiment_id, experiment), or {} if absent or
    damaged."""
    from gptkit.errors import RunError
    from gptkit.safeio import read_json
    from gptkit.store.rundir import MAX_RUN_FILE

    if not run.mlflow_file.exists():
        return {}
    try:  # a FIFO or /dev/zero in its place is refused, not read
        data = read_json(run.mlflow_file, "mlflow link", MAX_RUN_FILE, RunError)
    except RunError:
        return {}
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), str) for k in ("uri", "run_id")
    ):
        return {}
    return data


def _short(exc: Exception, limit: int = 300) -> str:
    """An error's message on one line for a warning: a long one keeps its start and its end
    (where requests' chains say the cause: "Connection refused"), cut between words."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) <= limit:
        return text
    head = text[: limit // 2].rsplit(" ", 1)[0]
    tail = text[-(limit // 2) :].split(" ", 1)[-1]
    return f"{head} ... {tail}"


# What a server that is there but slow or restarting gives (by class name, through the
# wrappers of MLflow, requests and urllib3): a timeout, a connection dropped or reset. Not a
# refused connection (nobody listening), nor a local store's error.
_TRANSIENT = {
    "TimeoutError",
    "Timeout",
    "ReadTimeout",
    "ReadTimeoutError",
    "ProtocolError",
    "RemoteDisconnected",
    "ConnectionResetError",
    "ConnectionAbortedError",
    "BrokenPipeError",
}


# MLflow's codes for an HTTP 5xx or 429 answer (mlflow.exceptions.get_error_code); an
# MlflowException that wraps another error has INTERNAL_ERROR too, so only an answer counts.
_BUSY_CODES = {
    "INTERNAL_ERROR",
    "TEMPORARILY_UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "RESOURCE_EXHAUSTED",
    "REQUEST_LIMIT_EXCEEDED",
}
# No connection was made (refused, or the connect itself timed out): nobody to wait for.
# urllib3's NewConnectionError is a kind of TimeoutError, so these are looked for first.
_NOT_CONNECTED = {"ConnectionRefusedError", "NewConnectionError", "ConnectTimeoutError"}


def _request_timeout() -> float:
    """One MLflow HTTP request's timeout in seconds: the user's MLFLOW_HTTP_REQUEST_TIMEOUT,
    else ours."""
    try:
        return float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", REQUEST_TIMEOUT_S))
    except ValueError:
        return REQUEST_TIMEOUT_S


def _there_but_slow(exc: BaseException) -> bool:
    """Whether ``exc`` says the server is there but slow or restarting: a 5xx or 429 answer,
    or (in what it wraps: its causes, context, ``reason`` and exception arguments) one of
    ``_TRANSIENT`` on a connection that was made."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    kinds: set[str] = set()  # the class names of everything in the chain, and their bases
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        kinds.update(c.__name__ for c in type(e).__mro__)
        todo += [e.__cause__, e.__context__, getattr(e, "reason", None), *e.args]
    if kinds & _NOT_CONNECTED:
        return False
    answered = "RestException" in kinds or "failed with error code" in str(exc)
    if answered and getattr(exc, "error_code", None) in _BUSY_CODES:
        return True  # a 5xx or 429 answer (a proxy's 502 while MLflow restarts, say)
    return bool(kinds & _TRANSIENT)


def _permanent(exc: Exception) -> bool:
    """A refusal that retrying cannot fix (as opposed to a store or server that is away)."""
    if isinstance(exc, (KeyError, TypeError, ValueError)) and not isinstance(exc, OSError):
        return not type(exc).__module__.startswith(("requests", "urllib3", "sqlalchemy"))
    return getattr(exc, "error_code", None) in PERMANENT
