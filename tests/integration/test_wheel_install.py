"""The wheel installs and serves on its own: built from the tracked files, `pip install`ed with the dependencies
its metadata names into a fresh venv outside the checkout, and run from there with nothing pointing back at the
checkout, `herd make-tiny` and `herd serve --no-auth` answer a first chat (issue 18's proof)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import herd
from bench.common import free_port
from tests.integration.wheel_build import ROOT, build_wheel


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv (the base interpreter, no system site packages) with the wheel and its dependencies."""
    work = tmp_path_factory.mktemp("wheel")
    assert not work.resolve().is_relative_to(ROOT), "the venv must live outside the checkout"
    wheel = build_wheel(work)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    installed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)],
                               cwd=work, env=_outside(venv), capture_output=True, text=True, timeout=900)
    assert installed.returncode == 0, installed.stderr[-3000:]
    return venv


def _outside(venv: Path) -> dict[str, str]:
    """The environment of a user of `venv`: no PYTHONPATH, no other venv or checkout on PATH, no Herd or Ray
    settings of the test run; Ray's token auth off, as in the other serving tests."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "RAY_ADDRESS") and not key.startswith("HERD_")}
    path = [entry for entry in env.get("PATH", "").split(os.pathsep)
            if entry and not Path(entry).resolve().is_relative_to(ROOT)]
    return {**env, "PATH": os.pathsep.join([str(venv / "bin"), *path]), "RAY_AUTH_MODE": "disabled"}


def _run(venv: Path, *args: str, cwd: Path) -> str:
    done = subprocess.run([str(venv / "bin" / args[0]), *args[1:]], cwd=cwd, env=_outside(venv),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(args)} exited with {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_venv_runs_its_own_herd(venv: Path, tmp_path: Path) -> None:
    where = _run(venv, "python", "-c", "import herd, sys; print(herd.__file__); print(sys.prefix)", cwd=tmp_path)
    module, prefix = where.split()
    assert Path(module).is_relative_to(venv) and Path(prefix) == venv, where
    assert (venv / "bin" / "herd").read_text().splitlines()[0] == f"#!{venv / 'bin' / 'python'}"
    assert _run(venv, "herd", "--version", cwd=tmp_path).strip() == f"herd {herd.__version__}"
    assert "--experts" in _run(venv, "herd", "expert-shard", "--help", cwd=tmp_path)


@pytest.fixture
def served(venv: Path, tmp_path: Path) -> Iterator[dict[str, str]]:
    """`herd serve --no-auth` of a tiny Scout made by the venv's `herd make-tiny`, up on /health/ready; SIGINT
    at the end (it stops its Ray), then SIGKILL to its whole process group (Ray's too) if it did not stop."""
    model = tmp_path / "tiny-scout"
    _run(venv, "herd", "make-tiny", "--preset", "scout", "--out", str(model), "--seed", "7", cwd=tmp_path)
    http_port, grpc_port = free_port(), free_port()
    (tmp_path / "herd.json").write_text(json.dumps({"ops_port": free_port()}))
    command = [str(venv / "bin" / "herd"), "serve", "--model", str(model), "--no-auth", "--config",
               str(tmp_path / "herd.json"), "--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    log = tmp_path / "herd-serve.log"
    url = f"http://127.0.0.1:{http_port}"
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=tmp_path, env=_outside(venv), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_ready(proc, url, log)
        yield {"url": url, "model": model.name}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, f"herd serve did not stop cleanly ({proc.returncode}): {log.read_text()[-3000:]}"


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"herd serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)  # polling a port: there is no event to await
    pytest.fail(f"herd serve not ready after 300 s:\n{log.read_text()[-3000:]}")


def test_herd_serve_from_the_venv_answers_a_first_chat(served: dict[str, str]) -> None:
    models = httpx.get(served["url"] + "/v1/models", timeout=30)
    assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == [served["model"]]
    chat = {"model": served["model"], "messages": [{"role": "user", "content": "Hello, herd."}], "max_tokens": 8}
    reply = httpx.post(served["url"] + "/v1/chat/completions", json=chat, timeout=120)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"], body
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 8, usage
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], usage
