"""MLflow tracking that never stops training.

Every call only puts an event on a queue. A background thread sends events to MLflow in order;
when the store or server fails it warns once, keeps the events (and mirrors them to
``mlflow-spool.jsonl`` in the run directory), and retries with a growing delay. What could not
be sent by the end stays in the spool and is sent first the next time the run is resumed.
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

SPOOL_FILE = "mlflow-spool.jsonl"
RUN_FILE = "mlflow.json"
DEFAULT_URI = "sqlite:///mlflow.db"


def resolve_uri(spec_uri: str | None) -> str:
    """The tracking URI; a relative SQLite path is made absolute (runs are reopened from
    other working directories by resume and export)."""
    uri = spec_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + os.path.abspath(uri[len(prefix):])
    return uri


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """{'model': {'d_model': 8}} -> {'model.d_model': '8'} (MLflow params are strings)."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = json.dumps(data) if isinstance(data, (list, type(None))) else str(data)
    return out


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
    ) -> None:
        self.parent_run_id = parent_run_id
        self.uri = uri
        self.experiment = experiment
        self.run_dir = Path(run_dir)
        self.run_name = run_name
        self.warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
        self.retry_seconds = retry_seconds
        saved = self._read_run_file()
        self.run_id: str | None = saved.get("run_id") if saved.get("uri") == uri else None
        self.pending: list[dict[str, Any]] = self._read_spool()
        self.failures = 0
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
        self._put({"op": "metrics", "metrics": metrics, "step": step,
                   "ts": int(time.time() * 1000)})

    def reopen(self) -> None:
        """Mark a resumed run as running again."""
        self._put({"op": "reopen"})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._put({"op": "artifact", "path": str(path), "artifact_path": artifact_path})

    def close(self, status: str = "FINISHED", timeout: float = 30.0) -> int:
        """Finish the run; wait up to ``timeout`` s for sending. Returns events left spooled."""
        self._put({"op": "end", "status": status})
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._stop = True
        left = len(self.pending)
        self._write_spool()
        return left

    # ------------------------------------------------------------------ worker

    _stop = False

    def _put(self, event: dict[str, Any]) -> None:
        self._queue.put(event)

    def _work(self) -> None:
        retry_at = 0.0
        done = False
        while not (done and not self.pending) and not self._stop:
            try:
                timeout = max(0.05, retry_at - time.time()) if self.pending else None
                item = self._queue.get(timeout=timeout)
                if item is None:
                    done = True
                else:
                    self.pending.append(item)
                    while True:  # take everything already queued, then send
                        try:
                            item = self._queue.get_nowait()
                        except queue.Empty:
                            break
                        if item is None:
                            done = True
                        else:
                            self.pending.append(item)
            except queue.Empty:
                pass
            if time.time() < retry_at and not done:
                continue
            try:
                self._flush()
                self.failures = 0
                if self._warned:
                    self.warn(f"MLflow tracking at {self.uri} is back; spooled events sent")
                    self._warned = False
            except Exception as exc:
                self.failures += 1
                self._write_spool()
                if not self._warned:
                    self.warn(
                        f"MLflow tracking at {self.uri} failed ({type(exc).__name__}: "
                        f"{str(exc)[:200]}); training goes on, events are spooled in "
                        f"{self.run_dir / SPOOL_FILE} and retried"
                    )
                    self._warned = True
                if done:
                    return  # one last try at the end; what is left stays in the spool
                retry_at = time.time() + min(30.0, self.retry_seconds * 2 ** min(self.failures, 4))

    def _connect(self):
        if self._client is None:
            import logging

            from mlflow.tracking import MlflowClient

            for name in ("mlflow", "alembic"):
                logging.getLogger(name).setLevel(logging.WARNING)

            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
            self._client = MlflowClient(tracking_uri=self.uri)
        client = self._client
        if self.run_id is None:
            exp = client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(self.experiment)
            tags = {"gptkit.run_dir": str(self.run_dir.resolve())}
            if self.parent_run_id:
                tags["mlflow.parentRunId"] = self.parent_run_id  # nests it under a sweep
            run = client.create_run(exp_id, run_name=self.run_name, tags=tags)
            self.run_id = run.info.run_id
            self._write_run_file({"uri": self.uri, "run_id": self.run_id,
                                  "experiment_id": exp_id, "experiment": self.experiment})
        return client

    def _flush(self) -> None:
        if not self.pending:
            return
        client = self._connect()
        from mlflow.entities import Metric, Param, RunTag

        while self.pending:
            event = self.pending[0]
            op = event["op"]
            if op == "metrics":
                # Send consecutive metric events in one batch (MLflow caps a batch at 1000).
                batch: list[Metric] = []
                n = 0
                while n < len(self.pending) and self.pending[n]["op"] == "metrics" and len(batch) < 900:
                    e = self.pending[n]
                    batch += [Metric(k, float(v), e["ts"], e["step"]) for k, v in e["metrics"].items()]
                    n += 1
                client.log_batch(self.run_id, metrics=batch)
                del self.pending[:n]
                continue
            if op == "params":
                items = [Param(k[:250], v[:6000]) for k, v in event["params"].items()]
                for i in range(0, len(items), 100):
                    client.log_batch(self.run_id, params=items[i : i + 100])
            elif op == "tags":
                client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in event["tags"].items()])
            elif op == "artifact":
                path = Path(event["path"])
                if path.is_dir():
                    client.log_artifacts(self.run_id, str(path), event["artifact_path"])
                elif path.exists():
                    client.log_artifact(self.run_id, str(path), event["artifact_path"])
            elif op == "end":
                client.set_terminated(self.run_id, status=event["status"])
            elif op == "reopen":
                client.update_run(self.run_id, status="RUNNING")
            self.pending.pop(0)
        self._write_spool()

    # ------------------------------------------------------------------ files

    def _read_run_file(self) -> dict[str, Any]:
        try:
            return json.loads((self.run_dir / RUN_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def _write_run_file(self, data: dict[str, Any]) -> None:
        path = self.run_dir / RUN_FILE
        tmp = path.with_name(f".{RUN_FILE}.tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)

    def _read_spool(self) -> list[dict[str, Any]]:
        from gptkit.run import read_jsonl

        return [e for e in read_jsonl(self.run_dir / SPOOL_FILE) if e.get("op") != "end"]

    def _write_spool(self) -> None:
        path = self.run_dir / SPOOL_FILE
        if not self.pending:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_name(f".{SPOOL_FILE}.tmp")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in self.pending))
        os.replace(tmp, path)
