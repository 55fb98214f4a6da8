"""A million rows through the real CLI with the null scorer (issue 15, section 2).

A synthetic JSONL of short conversations in every input format, mixed row by row (messages,
ShareGPT, Alpaca, prompt/completion; a stable ``id`` column; a few rows of no known format and a
few repeated ids, which must be rejected), goes through ``profit-prep score --backend null``
(every logprob 0, no model: the pipeline's own cost) with the SmolLM2 tokenizer, then
``profit-prep verify``, ``profit-prep stats --json`` and :func:`profit_prep.training.loader.load`.

Measured: wall time of each stage; peak RSS of the score process on the first 10% of the rows
and on all of them (its own ``VmHWM`` from ``/proc/self/status``, written as it exits); the time
from start to the first shard scored and the time a rerun of the finished output takes; the size
of ``run.json`` and ``manifest.json``; ``load`` tokens/s; and a ``kill -9`` at ~60% of the shards
followed by a rerun, whose output must equal an uninterrupted run's, shard for shard.

The uninterrupted run and the killed-and-resumed run go side by side (each is one process on one
core), so on 2 cores the whole mode takes about one run's time.

    python benchmarks/run.py --scale --json F        # 1,000,000 rows and the pipeline ceiling
    python benchmarks/scale.py --rows 20000 --json F   # this part alone, any size
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {
    "scale_rss_growth": ("<=", 1.10),
    "scale_plan_s": ("<", 10.0),
    "scale_rerun_noop_s": ("<", 10.0),
    "scale_load_tokens_per_s": (">=", 5e6),
    "scale_kill_resume_equal": ("==", True),
}
KILL_AT = 0.6  # share of shards written when the second run is killed

# Words of the synthetic conversations (so rows tokenize like prose, not random bytes).
_WORDS = np.array(str.split("""
the a of to and in is it you that was for on are with as his they be at one have this from or
had by word but what some we can out other were all there when up use your how said an each she
which do their time if will way about many then them write would like so these her long make
thing see him two has look more day could go come did number sound no most people my over know
water than call first who may down side been now find any new work part take get place made live
where after back little only round man year came show every good me give our under name very
through just form sentence great think say help low line differ turn cause much mean before move
right boy old too same tell does set three want air well also play small end put home read hand
port large spell add even land here must big high such follow act why ask men change went light
kind off need house picture try us again animal point mother world near build self earth father
head stand own page should country found answer school grow study still learn plant cover food
sun four between state keep eye never last let thought city tree cross farm hard start might
story saw far sea draw left late run don't while press close night real life few north 42 3.5
café naïve 東京 résumé"""))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the input


class _Texts:
    """Sentences of random words, drawn in bulk (one numpy call per 100k words)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.words: list[str] = []
        self.lengths: list[int] = []
        self.at = 0

    def __call__(self, lo: int, hi: int) -> str:
        if not self.lengths:
            self.lengths = self.rng.integers(0, 1 << 30, 10_000).tolist()
        n = lo + self.lengths.pop() % (hi - lo + 1)
        if self.at + n > len(self.words):
            self.words = self.words[self.at:] + _WORDS[
                self.rng.integers(0, len(_WORDS), 100_000)].tolist()
            self.at = 0
        text = " ".join(self.words[self.at : self.at + n])
        self.at += n
        return text[:1].upper() + text[1:] + ".?!"[n % 3]


def conversation_row(i: int, text: _Texts, kind: str) -> dict[str, Any]:
    """Row ``i`` in input format ``kind``: one or two turns, sometimes a system prompt."""
    rng = text.rng
    turns = 2 if rng.random() < 0.2 else 1
    system = text(3, 10) if rng.random() < 0.2 else None
    pairs = [(text(3, 25), text(4, 50)) for _ in range(turns)]
    if kind == "messages":
        messages = [{"role": "system", "content": system}] if system else []
        for user, assistant in pairs:
            messages += [{"role": "user", "content": user},
                         {"role": "assistant", "content": assistant}]
        return {"id": f"row-{i:07d}", "messages": messages}
    if kind == "sharegpt":
        turns_ = [t for user, assistant in pairs for t in
                  ({"from": "human", "value": user}, {"from": "gpt", "value": assistant})]
        row = {"id": f"row-{i:07d}", "conversations": turns_}
        return {**row, "system": system} if system else row
    if kind == "alpaca":
        user, assistant = pairs[0]
        extra = text(2, 15) if rng.random() < 0.4 else ""
        row = {"id": f"row-{i:07d}", "instruction": user, "input": extra, "output": assistant}
        return {**row, "system": system} if system else row
    user, assistant = pairs[0]
    if rng.random() < 0.25:  # TRL's conversational prompt/completion
        return {"id": f"row-{i:07d}", "prompt": [{"role": "user", "content": user}],
                "completion": [{"role": "assistant", "content": assistant}]}
    return {"id": f"row-{i:07d}", "prompt": user, "completion": assistant}


KINDS = ("messages", "sharegpt", "alpaca", "prompt_completion")


def write_conversations(path: Path, rows: int, seed: int = 0) -> dict[str, int]:
    """``rows`` rows of mixed formats as JSONL (deterministic for a seed); what it holds.

    Every 7,919th row has no known format and every 5,000th repeats the id of the row 1,000
    before it: both are rejected, so the rejection paths run at scale too.
    """
    text = _Texts(seed)
    kinds = text.rng.integers(0, len(KINDS), rows)
    held = dict.fromkeys([*KINDS, "unknown_format", "repeated_id"], 0)
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            if i % 7919 == 7918:
                row: dict[str, Any] = {"id": f"row-{i:07d}", "text": text(5, 20)}
                held["unknown_format"] += 1
            else:
                kind = KINDS[kinds[i]]
                row = conversation_row(i, text, kind)
                if i % 5000 == 4999:
                    row["id"] = f"row-{i - 1000:07d}"
                    held["repeated_id"] += 1
                else:
                    held[kind] += 1
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return held


def head(src: Path, dst: Path, rows: int) -> Path:
    """The first ``rows`` lines of ``src``."""
    with src.open("rb") as f, dst.open("wb") as out:
        for _, line in zip(range(rows), f):
            out.write(line)
    return dst


# --------------------------------------------------------------------------- processes


# The child: runs the CLI, then writes its own /proc/self/status (VmHWM: its peak RSS) beside.
_CHILD = (
    "import sys\n"
    "from profit_prep.cli import main\n"
    "rc = main(sys.argv[2:])\n"
    "open(sys.argv[1], 'w').write(open('/proc/self/status').read())\n"
    "sys.exit(rc)\n"
)


def _status_mb(text: str, field: str) -> float | None:
    m = re.search(rf"^{field}:\s*(\d+) kB", text, re.M)
    return round(int(m.group(1)) / 1024, 1) if m else None


def _shards_done(out: Path | None, known: int) -> int:
    """Shards written so far (in order, as a single-process run writes them), counting on from
    ``known``: a poll checks one file, not a listing of thousands."""
    while out is not None and (out / "data" / f"part-{known:05d}.parquet").exists():
        known += 1
    return known


def cli(
    argv: Sequence[str],
    *,
    out: Path | None = None,
    kill_at_shards: int | None = None,
    rss_at_shards: int | None = None,
    timeout: float = 3600,
) -> dict[str, Any]:
    """Run ``profit-prep ARGV`` in a fresh process and measure it.

    Returns the exit code, wall seconds, its peak RSS (``VmHWM`` it reports as it exits), the
    seconds until ``OUT/run.json`` and the first shard appeared, and stdout. Polls every 20 ms
    until the first shard, then every 100 ms: with ``kill_at_shards``, SIGKILLs it once that
    many shards exist; with ``rss_at_shards``, reads its VmHWM when that many exist (its peak
    so far, for growth within one run).
    """
    status_file = Path(tempfile.mkstemp(prefix="profit-status-")[1])
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(status_file), *argv],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    res: dict[str, Any] = {"argv": list(argv)}
    captured: dict[str, str] = {}

    def drain(name: str, stream: Any) -> None:
        captured[name] = stream.read()

    readers = [threading.Thread(target=drain, args=(n, s), daemon=True)
               for n, s in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for r in readers:
        r.start()
    done = 0
    while proc.poll() is None:
        now = time.perf_counter() - t0
        if now > timeout:
            proc.kill()
            res["error"] = f"timed out after {timeout:.0f} s"
            break
        if out is not None and "run_json_s" not in res and (out / "run.json").exists():
            res["run_json_s"] = round(now, 2)
        done = _shards_done(out, done)
        if done and "first_shard_s" not in res:
            res["first_shard_s"] = round(now, 2)
        if rss_at_shards is not None and done >= rss_at_shards and "rss_at_shards_mb" not in res:
            with contextlib.suppress(OSError):  # it may have just exited
                res["rss_at_shards_mb"] = _status_mb(
                    Path(f"/proc/{proc.pid}/status").read_text(), "VmHWM")
        if kill_at_shards is not None and done >= kill_at_shards:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            res["killed_at_shards"] = done
            break
        time.sleep(0.1 if done else 0.02)
    proc.wait()
    for r in readers:
        r.join()
    res["wall_s"] = round(time.perf_counter() - t0, 2)
    res["rc"] = proc.returncode
    status = status_file.read_text()
    status_file.unlink()
    res["peak_rss_mb"] = _status_mb(status, "VmHWM") if status else None
    res["stdout"] = captured.get("stdout", "")
    if proc.returncode not in (0, -signal.SIGKILL):
        res["stderr_tail"] = captured.get("stderr", "")[-2000:]
    return res


def score_argv(data: Path, out: Path, model: Path, shard_size: int) -> list[str]:
    return ["score", "--data", str(data), "--out", str(out), "--model", str(model),
            "--backend", "null", "--id-field", "id", "--shard-size", str(shard_size),
            "--quiet"]


# --------------------------------------------------------------------------- checks


def compare_outputs(a: Path, b: Path) -> dict[str, Any]:
    """Whether two finished outputs hold the same rows: shard by shard, the same file bytes (or
    failing that the same ids, tokens, masks and logprobs), the same rejected rows and counts."""
    import pyarrow.parquet as pq

    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    files = [s["file"] for s in ma["shards"]]
    same_file = sum(x == y for x, y in zip(ma["shards"], mb["shards"], strict=False))
    differ = []
    columns = ["example_id", "source_index", "input_ids", "response_mask", "logprobs",
               "loss_mask"]
    for x, y in zip(ma["shards"], mb["shards"], strict=False):
        if x != y and not pq.read_table(a / x["file"], columns=columns).equals(
                pq.read_table(b / y["file"], columns=columns)):
            differ.append(x["file"])
    rejected_same = (a / "rejected.jsonl").read_bytes() == (b / "rejected.jsonl").read_bytes()
    equal = (len(ma["shards"]) == len(mb["shards"]) and not differ and rejected_same
             and ma["counts"] == mb["counts"])
    return {"shards": len(files), "shards_identical_files": same_file,
            "shards_differing": differ[:10], "rejected_identical": rejected_same,
            "counts_equal": ma["counts"] == mb["counts"], "equal": equal}


def rows_once(out: Path, n_rows: int) -> dict[str, Any]:
    """Every input row exactly once, scored or rejected: none lost, none doubled."""
    import pyarrow.dataset as pads

    scored = pads.dataset(out / "data").to_table(columns=["source_index"])["source_index"]
    rejected = [json.loads(line)["source_index"]
                for line in (out / "rejected.jsonl").read_text().splitlines()]
    seen = np.concatenate([scored.to_numpy(), np.asarray(rejected, np.int64)])
    counts = np.bincount(seen, minlength=n_rows)
    return {"scored": len(scored), "rejected": len(rejected),
            "lost": int((counts == 0).sum()), "doubled": int((counts > 1).sum()),
            "once": bool(len(counts) == n_rows and (counts == 1).all())}


_LOAD_CHILD = """
import json, sys, time
import datasets
datasets.config.HF_DATASETS_CACHE = sys.argv[2]
from profit_prep.training.loader import load
t0 = time.perf_counter()
ds = load(sys.argv[1], tau=0.2)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "rows": len(ds)}))
"""


def measure_load(out: Path, tokens: int, cache: Path) -> dict[str, Any]:
    """``load(out, tau=0.2)`` (verify + re-threshold + write the Arrow file) in a fresh process,
    cold cache: tokens/s, and that process's peak RSS."""
    status = Path(tempfile.mkstemp(prefix="profit-status-")[1])
    code = _LOAD_CHILD + f"open({str(status)!r}, 'w').write(open('/proc/self/status').read())\n"
    proc = subprocess.run([sys.executable, "-c", code, str(out), str(cache)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    peak = _status_mb(status.read_text(), "VmHWM") if status.read_text() else None
    status.unlink()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": proc.stderr[-1500:]}
    r = json.loads(lines[-1])
    return {"seconds": round(r["seconds"], 2), "rows": r["rows"], "peak_rss_mb": peak,
            "tokens_per_s": round(tokens / r["seconds"])}


# --------------------------------------------------------------------------- the run


def measure_scale(
    rows: int,
    work: Path,
    model_dir: Path,
    *,
    shard_size: int = 1000,
    small_share: float = 0.1,
    parallel: bool = True,
    step: Callable[[str], None] = log,
) -> dict[str, Any]:
    """The whole scale run in ``work``; the figures (see the module's docstring)."""
    res: dict[str, Any] = {"scale_rows": rows, "scale_shard_size": shard_size}
    stages: dict[str, float] = {}
    n_shards = -(-rows // shard_size)
    small_rows = max(shard_size, int(rows * small_share))

    step(f"scale: writing {rows:,} mixed-format rows")
    t0 = time.perf_counter()
    data = work / "rows.jsonl"
    res["scale_input"] = write_conversations(data, rows)
    small = head(data, work / "rows-small.jsonl", small_rows)
    stages["generate_s"] = round(time.perf_counter() - t0, 1)
    res["scale_input_bytes"] = data.stat().st_size

    out, killed = work / "out", work / "out-killed"
    kill_at = max(1, round(n_shards * KILL_AT))
    step(f"scale: score {rows:,} rows ({n_shards} shards); beside it a run killed at "
         f"{kill_at} shards, then resumed")

    def uninterrupted() -> dict[str, Any]:
        return cli(score_argv(data, out, model_dir, shard_size), out=out,
                   rss_at_shards=max(1, small_rows // shard_size))

    def interrupted() -> tuple[dict[str, Any], dict[str, Any]]:
        first = cli(score_argv(data, killed, model_dir, shard_size), out=killed,
                    kill_at_shards=kill_at)
        return first, cli(score_argv(data, killed, model_dir, shard_size), out=killed)

    t0 = time.perf_counter()
    if parallel:
        with ThreadPoolExecutor(2) as pool:
            a, b = pool.submit(uninterrupted), pool.submit(interrupted)
            main, (first, resumed) = a.result(), b.result()
    else:
        main = uninterrupted()
        first, resumed = interrupted()
    stages["score_and_kill_resume_s"] = round(time.perf_counter() - t0, 1)
    for name, r in (("score", main), ("killed", first), ("resumed", resumed)):
        r.pop("stdout", None)
        if r.get("rc") not in (0, -signal.SIGKILL) or "error" in r:
            raise RuntimeError(f"scale: {name} run failed: {r}")
    stages["score_s"] = main["wall_s"]
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = manifest["counts"]["tokens"]
    res["scale_score"] = {**main, "run": manifest["run"], "counts": manifest["counts"],
                          "formats": manifest["render"].get("formats")}
    res["scale_tokens"] = tokens
    res["scale_rows_per_s"] = round(rows / main["wall_s"], 1)
    res["scale_plan_s"] = main.get("first_shard_s")
    res["scale_run_json_s"] = main.get("run_json_s")

    step("scale: compare the killed-and-resumed output with the uninterrupted one")
    res["scale_kill"] = {"killed_at_shards": first.get("killed_at_shards"),
                         "of_shards": n_shards, "killed_run_s": first["wall_s"],
                         "resume_s": resumed["wall_s"],
                         "resume_peak_rss_mb": resumed["peak_rss_mb"],
                         "resumed_shards": json.loads((killed / "manifest.json").read_text())[
                             "run"]["resumed_shards"],
                         **compare_outputs(out, killed), "rows": rows_once(killed, rows)}
    res["scale_kill_resume_equal"] = bool(res["scale_kill"]["equal"]
                                          and res["scale_kill"]["rows"]["once"])
    shutil.rmtree(killed, ignore_errors=True)

    step("scale: rerun of the finished output (nothing to do)")
    noop = cli(score_argv(data, out, model_dir, shard_size), out=out)
    noop.pop("stdout", None)
    noop["resumed_shards"] = json.loads((out / "manifest.json").read_text())["run"][
        "resumed_shards"]
    res["scale_rerun_noop"] = noop
    res["scale_rerun_noop_s"] = noop["wall_s"] if noop["rc"] == 0 else None
    stages["rerun_noop_s"] = noop["wall_s"]

    step("scale: verify")
    verify = cli(["verify", str(out)])
    res["scale_verify_ok"] = verify["rc"] == 0 and verify["stdout"].strip().endswith("ok")
    stages["verify_s"] = verify["wall_s"]
    res["scale_verify_peak_rss_mb"] = verify["peak_rss_mb"]

    step("scale: stats --json")
    stats = cli(["stats", str(out), "--json"])
    stages["stats_s"] = stats["wall_s"]
    res["scale_stats_peak_rss_mb"] = stats["peak_rss_mb"]
    try:
        stats_json = json.loads(stats["stdout"])
        res["scale_stats_ok"] = stats["rc"] == 0 and isinstance(stats_json, dict)
    except ValueError:
        res["scale_stats_ok"] = False
        res["scale_stats_error"] = stats.get("stderr_tail", stats["stdout"][-500:])

    step("scale: load (tau=0.2, cold cache)")
    loaded = measure_load(out, tokens, work / "hf-cache")
    res["scale_load"] = loaded
    res["scale_load_tokens_per_s"] = loaded.get("tokens_per_s")
    stages["load_s"] = loaded.get("seconds")
    shutil.rmtree(work / "hf-cache", ignore_errors=True)

    res["scale_run_json_bytes"] = (out / "run.json").stat().st_size
    res["scale_manifest_bytes"] = (out / "manifest.json").stat().st_size
    res["scale_output_bytes"] = sum(f.stat().st_size for f in (out / "data").iterdir())
    shutil.rmtree(out, ignore_errors=True)

    step(f"scale: peak RSS on the first {small_rows:,} rows")
    small_run = cli(score_argv(small, work / "out-small", model_dir, shard_size),
                    out=work / "out-small")
    small_run.pop("stdout", None)
    shutil.rmtree(work / "out-small", ignore_errors=True)
    res["scale_rss"] = {
        "method": "VmHWM from /proc/self/status of the score process, written as it exits",
        f"peak_mb_{small_rows}_rows": small_run["peak_rss_mb"],
        f"peak_mb_{rows}_rows": main["peak_rss_mb"],
        f"peak_mb_{rows}_rows_run_at_{small_rows}_rows": main.get("rss_at_shards_mb"),
        "small_run_wall_s": small_run["wall_s"],
    }
    # The same start-up on a tenth of the rows: what of scale_plan_s grows with them.
    res["scale_plan_s_small"] = small_run.get("first_shard_s")
    if small_run["peak_rss_mb"] and main["peak_rss_mb"]:
        res["scale_rss_growth"] = round(main["peak_rss_mb"] / small_run["peak_rss_mb"], 3)
    else:
        res["scale_rss_growth"] = None
    res["scale_stages_s"] = stages
    return res


def targets(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each scale figure with its target and whether it is met (None: not measured)."""
    out = {}
    for key, (op, want) in TARGETS.items():
        value = res.get(key)
        met = None if value is None else {
            "<=": lambda v, w: v <= w, "<": lambda v, w: v < w, ">=": lambda v, w: v >= w,
            "==": lambda v, w: v == w}[op](value, want)
        out[key] = {"target": f"{op} {want:g}" if not isinstance(want, bool) else "true",
                    "value": value, "met": met}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--serial", action="store_true",
                        help="run the killed-and-resumed run after the uninterrupted one")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from profit_prep.scorers.models import convert_smollm2

    work = Path(tempfile.mkdtemp(prefix="profit-scale-"))
    try:
        res = measure_scale(args.rows, work, convert_smollm2(), shard_size=args.shard_size,
                            parallel=not args.serial)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["scale_targets"] = targets(res)
    print(json.dumps(res["scale_targets"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
