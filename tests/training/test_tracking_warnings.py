"""The one-line warning training prints when the MLflow server fails."""

from pathlib import Path

from gptkit.training.tracking import _short


def test_a_long_connection_error_keeps_its_cause_and_is_cut_between_words():
    """The warning cut requests' message at 200 characters, mid-word, before the cause."""
    message = (
        "API request to http://127.0.0.1:5077/api/2.0/mlflow/experiments/get-by-name failed "
        "with exception HTTPConnectionPool(host='127.0.0.1', port=5077): Max retries exceeded "
        "with url: /api/2.0/mlflow/experiments/get-by-name?experiment_name=trial-base (Caused "
        "by NewConnectionError('<urllib3.connection.HTTPConnection object at 0x7f3e>: Failed "
        "to establish a new connection: [Errno 111] Connection refused'))"
    )
    short = _short(Exception(message))
    assert short.startswith("API request to http://127.0.0.1:5077/")
    assert short.endswith("[Errno 111] Connection refused'))") and " ... " in short
    assert len(short) <= 305
    words = set(message.split())
    assert all(w in words for w in short.replace(" ... ", " ").split())  # no word cut
    assert _short(Exception("line one\n  line two")) == "line one line two"


def test_the_code_tags_say_the_commit_and_whether_it_had_changes(tmp_path, monkeypatch):
    """Only the commit was tagged: a run trained from a checkout with edited files was
    recorded as that commit."""
    import subprocess

    from gptkit.training.record import code_tags

    def git(*args):
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=tmp_path, check=True, capture_output=True,
        )  # fmt: skip

    git("init", "-q")
    (tmp_path / "spec.yaml").write_text("name: a\n")
    git("add", "spec.yaml")
    git("commit", "-q", "-m", "spec")
    monkeypatch.chdir(tmp_path)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True
    ).stdout.strip()
    tags = code_tags()
    assert tags["mlflow.source.git.commit"] == head
    assert tags["gptkit.source.git.dirty"] == "false"
    (tmp_path / "spec.yaml").write_text("name: b\n")
    assert code_tags()["gptkit.source.git.dirty"] == "true"
    monkeypatch.chdir(tmp_path.parent)  # not a checkout: no commit claimed
    tags = code_tags()
    assert "mlflow.source.git.commit" not in tags
    import gptkit

    if (Path(gptkit.__file__).resolve().parents[1] / ".git").exists():  # an editable checkout
        assert len(tags["gptkit.code.git.commit"]) == 40
        assert tags["gptkit.code.git.dirty"] in ("true", "false")


def test_only_a_server_that_is_there_but_slow_is_waited_for_at_a_runs_end(tmp_path, monkeypatch):
    """The errors the real MLflow client raises: a dropped connection or a 502 (a proxy in
    front of a restarting MLflow) is worth another try at the end of a run; a refused one
    (nobody listening, though urllib3 calls it a kind of timeout) and a local store's error
    are not."""
    import http.server
    import socket
    import threading

    from mlflow.tracking import MlflowClient

    from gptkit.training.tracking import _there_but_slow
    from tests.mlflow_server import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # as the tracker sets them
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    (tmp_path / "file").write_text("")

    def error_of(uri):
        try:
            MlflowClient(uri).search_experiments()
        except Exception as exc:
            return exc
        raise AssertionError(f"{uri} answered")

    class BadGateway(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(502)
            self.end_headers()
            self.wfile.write(b"<html>502 Bad Gateway</html>")

        do_POST = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    gateway = http.server.ThreadingHTTPServer(("127.0.0.1", 0), BadGateway)
    threading.Thread(target=gateway.serve_forever, daemon=True).start()
    listener = socket.create_server(("127.0.0.1", 0))

    def drop():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed at the end
            conn.recv(100)
            conn.close()  # read the request, answer nothing

    threading.Thread(target=drop, daemon=True).start()
    try:
        assert _there_but_slow(error_of(f"http://127.0.0.1:{listener.getsockname()[1]}"))
        assert _there_but_slow(error_of(f"http://127.0.0.1:{gateway.server_address[1]}"))
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        gateway.shutdown()
    assert not _there_but_slow(error_of(f"http://127.0.0.1:{free_port()}"))
    assert not _there_but_slow(error_of(f"sqlite:///{tmp_path / 'file' / 'm.db'}"))
