"""What a ``retrain`` command costs outside its own work: the process's wall time minus the
run's ``seconds`` (the flow's own duration), on Prefect's temporary API (cold, no server,
``RETRAIN_AUTO_SERVER=0``), as a user meets it on a new PREFECT_HOME (the first command starts
the local server, the next ones use it), and on the local server (``retrain server start``; its
first run, then the measured ones, which run in the resident process once it has finished its
imports: each row says whether it did), plus ``retrain --help`` and a bad flag.

    .venv/bin/python benchmarks/bench_cli_overhead.py [--data ../shared/data/MerchData.zip]
        [--weights ../shared/weights/squeezenet1_1_caffe-2c890718.pth] [--cold 1] [--repeat 2]

Each figure is printed with the load average beside it: on a shared machine only figures
taken in the same run compare. Uses its own PREFECT_HOME and store under a temporary folder
and a free port; the server it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def retrain(args: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run(
        [str(Path(sys.executable).parent / "retrain"), *args], env=env, capture_output=True, text=True
    )
    return time.perf_counter() - started, done


def load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


def resident_commands(env: dict[str, str]) -> int:
    """How many commands the resident process has run (its log has a line per command)."""
    log = Path(env["PREFECT_HOME"]) / "retrain-resident.log"
    return log.read_text().count(": retrain ") if log.exists() else 0


def timed_run(label: str, run_args: list[str], env: dict[str, str]) -> dict:
    before = resident_commands(env)
    wall, done = retrain(run_args, env)
    if done.returncode != 0:
        raise SystemExit(f"{label}: retrain run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    outside = wall - summary["seconds"]
    row = {"run": label, "wall_s": round(wall, 2), "flow_s": round(summary["seconds"], 2)}
    row.update(outside_s=round(outside, 2), outside_share=round(outside / wall, 3), ui_url=summary.get("ui_url"))
    row["in_resident_process"] = resident_commands(env) > before
    print(json.dumps(row), load(), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(SHARED / "data" / "MerchData.zip"))
    parser.add_argument("--weights", default=str(SHARED / "weights" / "squeezenet1_1_caffe-2c890718.pth"))
    parser.add_argument("--network", default="squeezenet-caffe")
    parser.add_argument("--repeat", type=int, default=2, help="measured runs on the server (after its first)")
    parser.add_argument(
        "--cold", type=int, default=1, help="runs without a server (each starts Prefect's temporary API)"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="retrain-bench-cli-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(work / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    run_args = ["run", args.data, "--network", args.network, "--weights", args.weights]
    run_args += ["--store", str(work / "store"), "--json"]
    cold_env = {**env, "RETRAIN_AUTO_SERVER": "0"}
    auto_env = {**env, "PREFECT_HOME": str(work / "prefect-home-auto")}
    try:
        for what, cli_args in (("retrain --help", ["--help"]), ("bad flag", ["run", "--max-epochs", "x"])):
            wall, done = retrain(cli_args, env)
            print(json.dumps({"command": what, "wall_s": round(wall, 2), "exit": done.returncode}), load())
        for i in range(args.cold):
            timed_run(f"cold {i + 1} (no server, RETRAIN_AUTO_SERVER=0: Prefect's temporary API)", run_args, cold_env)
        timed_run("new home, first command (starts the local server)", run_args, auto_env)
        timed_run("new home, second command (on that server)", run_args, auto_env)
        retrain(["server", "stop"], auto_env)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        wall, done = retrain(["server", "start", "--port", str(port), "--json"], env)
        print(json.dumps({"command": "retrain server start", "wall_s": round(wall, 2)}), load())
        timed_run("server: first run", run_args, env)
        for i in range(args.repeat):
            timed_run(f"server {i + 2}", run_args, env)
        for what, cli_args in (
            ("retrain server status", ["server", "status"]),
            ("retrain server stop", ["server", "stop"]),
        ):
            wall, done = retrain(cli_args, env)
            print(json.dumps({"command": what, "wall_s": round(wall, 2)}), load())
            print("  " + done.stdout.strip().replace("\n", "\n  "))
    finally:
        retrain(["server", "stop"], env)
        retrain(["server", "stop"], auto_env)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
