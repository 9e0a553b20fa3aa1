"""Serving settings side by side, interleaved: A, B, A, B … so that a machine whose speed drifts charges
both alike. For changes too small for two runs of ``serving.py`` minutes apart to tell apart.

    .venv/bin/python benchmarks/serving_ab.py --servers rlops,rlops-b16 --rounds 2

Each round starts every named server of ``serving.py`` in turn (same policy, same request bodies, same
measuring code), loads it for ``--server-warmup`` seconds at 64 clients, then measures single-observation
requests at each ``--clients`` count. Besides latency and the CPU per request it reads each server's
decision log after the stop: decisions of one server batch share one time stamp, so the log tells how
full the batches were. Writes ``results.json`` and ``results.md`` to ``benchmarks/results/serving-ab/``.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving as S  # the serving benchmark's servers and measuring code

OUT = Path(__file__).resolve().parent / "results" / "serving-ab"
app = typer.Typer(add_completion=False, help=__doc__.splitlines()[0] if __doc__ else None)


def batch_fullness(decisions: Path, batch_size: int) -> dict[str, float]:
    """Server batches in a decision log: their count, mean size and the share of decisions in full ones."""
    per_time: collections.Counter[float] = collections.Counter()
    for path in decisions.rglob("*.jsonl"):
        with open(path, encoding="utf-8") as f:
            for line in f:
                per_time[json.loads(line)["time"]] += 1
    decided = sum(per_time.values())
    batches = len(per_time)
    full = sum(n for n in per_time.values() if n >= batch_size)
    return {
        "decisions": decided,
        "batches": batches,
        "mean_batch": decided / batches if batches else 0.0,
        "share_in_full_batches": full / decided if decided else 0.0,
    }


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Serving settings, interleaved",
        "",
        f"Run {result['started']} on {result['cpus']} CPUs; commit {result['commit']}.",
        "",
        "```bash",
        result["command"],
        "```",
        "",
        "| round | server | clients | requests/s | p50 ms | p99 ms | frontend ms/req | workers ms/req |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in result["points"]:
        lines.append(
            f"| {p['round']} | {p['server']} | {p['clients']} | {p['rps']:,.0f} | {p['p50']:.2f} | "
            f"{p['p99']:.2f} | {p['frontend_ms']:.3f} | {p['workers_ms']:.3f} |"
        )
    lines += [
        "",
        "| round | server | decisions | server batches | mean batch | share in full batches |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for b in result["batches"]:
        lines.append(
            f"| {b['round']} | {b['server']} | {b['decisions']:,} | {b['batches']:,} | "
            f"{b['mean_batch']:.1f} | {b['share_in_full_batches']:.1%} |"
        )
    return "\n".join(lines) + "\n"


@app.command()
def main(
    servers: Annotated[
        str, typer.Option("--servers", help="Two or more servers of serving.py.")
    ] = "rlops,rlops-b16",
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Times each server is started.")] = 2,
    clients: Annotated[str, typer.Option("--clients", help="Concurrent clients per point.")] = "1,16,64",
    duration: Annotated[int, typer.Option("--duration", min=1, help="Seconds measured per point.")] = 10,
    server_warmup: Annotated[int, typer.Option("--server-warmup", min=0, help="Seconds of load first.")] = 20,
    registry: Annotated[
        Path | None, typer.Option("--registry", help="Serve this registry's champion, not a new one.")
    ] = None,
    name: Annotated[str, typer.Option("--name", help="Policy name.")] = "cartpole",
) -> None:
    """Start the named servers in turn, ``--rounds`` times, and measure each the same way."""
    if shutil.which("wrk") is None:
        raise typer.BadParameter("wrk is not installed (Debian: apt-get install -y wrk)", param_hint="wrk")
    known = {s.key: s for s in S.SERVERS if not s.naive}
    keys = [k.strip() for k in servers.split(",") if k.strip()]
    if len(keys) < 2 or any(k not in known for k in keys):
        raise typer.BadParameter(
            f"name two or more of {', '.join(known)}; got {servers!r}", param_hint="--servers"
        )
    counts = S._int_list(clients, "--clients")
    settings = S.Settings(
        duration=duration,
        warmup=2,
        clients=counts,
        batch_clients=(),
        wrk_threads=1,
        floor_seconds=0.0,
        server_warmup=server_warmup,
    )
    work = Path(tempfile.mkdtemp(prefix="rlops-serving-ab-"))
    started = dt.datetime.now(dt.UTC)
    points: list[dict[str, Any]] = []
    batches: list[dict[str, Any]] = []
    try:
        reg, policy, version_dir = S.prepare_policy(
            work, registry.resolve() if registry else None, name, 100, S.ENV_ID
        )
        card = json.loads((version_dir / "model-card.json").read_text(encoding="utf-8"))
        singles, _ = S.request_bodies(card)
        for r in range(1, rounds + 1):
            for key in keys:
                spec = known[key]
                run_work = work / f"round-{r}"
                run_work.mkdir(exist_ok=True)
                with S.rlops_server(run_work, reg, policy, spec) as running:
                    lua = S.write_lua(run_work / f"{key}.lua", running.predict_path, running.key, singles)
                    url = running.inference_url + running.predict_path
                    if server_warmup:
                        S.run_wrk(url, lua, 64, server_warmup, 1)
                    for c in counts:
                        p, _ = S.measure_point(running, lua, "single", c, 1, settings)
                        row = {
                            "round": r,
                            "server": key,
                            "clients": c,
                            "rps": p.rps,
                            "p50": p.latency_ms["p50"],
                            "p99": p.latency_ms["p99"],
                            "frontend_ms": p.cpu["frontend_ms_per_request"],
                            "workers_ms": p.cpu["workers_ms_per_request"],
                        }
                        points.append(row)
                        S.console.print(
                            f"round {r} {key:>12} {c:>3} clients: {p.rps:8,.0f} req/s  p50 "
                            f"{row['p50']:6.2f}  p99 {row['p99']:6.2f} ms"
                        )
                    decisions = running.decision_dir
                # Read after the stop: the workers have written every queued decision by then.
                if decisions is not None:
                    batches.append({"round": r, "server": key, **batch_fullness(decisions, spec.batch_size)})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "started": started.isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "commit": S._commit(),
        "command": " ".join([".venv/bin/python", "benchmarks/serving_ab.py", *sys.argv[1:]]),
        "points": points,
        "batches": batches,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (OUT / "results.md").write_text(_markdown(result), encoding="utf-8")
    table = Table("round", "server", "decisions", "mean batch", "in full batches")
    for b in batches:
        table.add_row(
            str(b["round"]), b["server"], f"{b['decisions']:,}", f"{b['mean_batch']:.1f}",
            f"{b['share_in_full_batches']:.1%}",
        )  # fmt: skip
    S.console.print(table)
    S.console.print(f"wrote {OUT / 'results.json'} and {OUT / 'results.md'}")


if __name__ == "__main__":
    app()
