"""``labloop demo``: one campaign on Enamine 10k through the whole embedded stack.

The LIMS publisher registers the pool, the worker requests compounds, the
virtual lab answers from the docking scores (unscored compounds fail), readings
flow back, and everything lands in ClickHouse. At the end the campaign is scored
from ClickHouse itself, as an analyst would, against MolPAL's published runs.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from labloop.consumers import LabConfig, Oracle, RobotClient, VirtualLab
from labloop.consumers.kafka import make_consumer, make_producer
from labloop.consumers.publisher import publish_records
from labloop.models import TopK, round_targets, topk_measures
from labloop.schemas import TOPICS, Codec, LabloopError
from labloop.streams.campaign import now_ms
from labloop.streams.datasets import Dataset, enamine10k, published_results
from labloop.streams.definition import DEFAULT_LEARNER, DEFAULT_POLICY, CampaignSpec
from labloop.streams.runtime import Stack
from labloop.streams.settings import Settings
from labloop.streams.sql import analyst_client

__all__ = ["DemoFailed", "run_demo", "run_on_stack"]

EXAMPLE_SQL = [
    ("Best compounds measured so far",
     "SELECT r.compound_id, c.smiles, r.value FROM readings r JOIN compounds c USING (campaign_id, compound_id) "
     "WHERE r.campaign_id = '{cid}' ORDER BY r.value LIMIT 5"),
    ("How each batch was chosen",
     "SELECT batch, count() AS n, any(policy) AS policy, round(avg(predicted_mean), 2) AS mean_pred, "
     "round(avg(predicted_std), 2) AS mean_std FROM requests WHERE campaign_id = '{cid}' GROUP BY batch ORDER BY batch"),
    ("Request outcomes",
     "SELECT status, count() FROM request_status WHERE campaign_id = '{cid}' GROUP BY status ORDER BY status"),
]


class DemoFailed(LabloopError):
    """The demo campaign did not finish, or its results did not land."""


def _campaign_spec(cid: str, ds: Dataset, assay_id: str, init: int, batch: int, budget: int, learner: str, policy: str,
                   seed: int) -> CampaignSpec:
    """The demo's campaign: rounds of ``batch`` after a random start of ``init``, once the whole pool is registered."""
    return CampaignSpec(cid, assay_id, ds.unit, direction="MINIMIZE" if ds.minimize else "MAXIMIZE", batch_size=batch,
                        init_size=init, budget=budget, min_pool_size=len(ds.smiles), policy=policy, learner=learner,
                        seed=seed)


def _wait_done(stack: Stack, codec: Codec, cid: str, budget: int, lab: VirtualLab, timeout_s: float,
               console: Console, progress: bool) -> dict[str, Any]:
    mon = make_consumer(stack.kafka_config, f"labloop-demo-{uuid.uuid4().hex[:8]}", stack.settings.kafka_session_timeout_s)
    mon.subscribe([TOPICS["model_updates"].name])
    last: dict[str, Any] = {}
    deadline = time.monotonic() + timeout_s
    cols = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn())
    with Progress(*cols, console=console, disable=not progress) as bar:
        task = bar.add_task("experiments answered", total=budget, info="")
        try:
            while time.monotonic() < deadline:
                stack.check()
                if lab.errors:
                    raise DemoFailed(f"virtual lab failed: {lab.errors[0]!r}")
                for m in mon.consume(100, 0.5):
                    value = m.value()
                    if m.error() or not value:
                        continue
                    r = codec.decode(value).record
                    if r["campaign_id"] != cid:
                        continue
                    last = r
                    answered = r["n_measured"] + r["n_failed"]
                    best = "" if r["best_value"] is None else f"best {r['best_value']:.1f}"
                    bar.update(task, completed=answered, info=f"model v{r['model_version']} · n_train {r['n_train']} · {best}")
                    if r["done"]:
                        return last
        finally:
            mon.close()
    raise DemoFailed(f"campaign {cid} did not finish within {timeout_s:.0f}s; last model update: {last or 'none'}; "
                     f"logs under {stack.settings.data_dir / 'logs'}")


def _score(client: Any, cid: str, ds: Dataset, top_k: int) -> list[dict[str, Any]]:
    """Per-batch measures computed from ClickHouse."""
    reqs = client.query(f"SELECT batch, smiles FROM requests WHERE campaign_id = '{cid}' ORDER BY sequence").result_rows
    vals = dict(client.query(f"SELECT c.smiles, any(r.value) FROM readings r JOIN compounds c USING (campaign_id, compound_id) "
                             f"WHERE r.campaign_id = '{cid}' GROUP BY c.smiles").result_rows)
    top = TopK(ds.values, top_k, ds.minimize, ds.smiles)
    rounds, found, smiles_found, n = [], [], [], 0
    batches = sorted({b for b, _ in reqs})
    for b in batches:
        for bb, s in reqs:
            if bb == b:
                n += 1
                if s in vals:
                    found.append(vals[s])
                    smiles_found.append(s)
        m = topk_measures(top, found, smiles_found)
        rounds.append({"n_acquired": n, **{k: round(v, 2) for k, v in m.items()}})
    return rounds


def _plot(rounds: list[dict[str, Any]], pub: dict[str, list[tuple[int, float, float]]], path: Path, pool: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x = [100 * r["n_acquired"] / pool for r in rounds]
    ax.plot(x, [r["pct_topk_scores_found"] for r in rounds], "o-", lw=2.5, color="C3", label="labloop (this run)")
    for key, style in (("mpn greedy", "s--"), ("nn greedy", "^--"), ("rf greedy", "v--"), ("random", "x:")):
        if key in pub:
            color = "0.5" if key == "random" else None
            ax.errorbar([100 * n / pool for n, _, _ in pub[key]], [m for _, m, _ in pub[key]],
                        yerr=[s for _, _, s in pub[key]], fmt=style, capsize=2, alpha=0.8, color=color,
                        label=f"MolPAL {key}")
    ax.set_xlabel("% of pool acquired")
    ax.set_ylabel("% of top-100 scores found")
    ax.set_title("Enamine 10k, thymidylate kinase docking")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_on_stack(settings: Settings, ds: Dataset, init: int, batch: int, budget: int, *, seed: int = 0,
                 top_k: int = 100, timeout_s: float = 900, progress: bool = True, lab_latency_s: float = 0.0,
                 learner: str = DEFAULT_LEARNER, policy: str = DEFAULT_POLICY, assay_id: str = "objective",
                 console: Console | None = None) -> dict[str, Any]:
    """One campaign through the embedded stack with a virtual lab answering from ``ds``.

    Returns the per-batch measures computed from ClickHouse, the readings the lab
    published and found in ClickHouse, and the example queries' results.
    """
    console = console or Console()
    cid = f"{ds.name.split('.')[0]}-{time.strftime('%Y%m%d-%H%M%S')}"
    codec = settings.codec()
    console.print(f"[bold]campaign[/] [cyan]{cid}[/]: pool {len(ds.smiles)}, random start {init}, then batches of "
                  f"{batch}, budget {budget}; {learner} + {policy}")
    with Stack(settings) as stack:
        where = ("embedded Tansu, log " + ("on disk" if stack.broker.durable else "in memory")) if stack.broker \
            else "external"
        console.print(f"  broker   {stack.bootstrap} ({where})")
        console.print(f"  sink     ClickHouse {settings.clickhouse_target}, HTTP at {stack.clickhouse_url}")
        console.print(f"  worker   Faust, logs in {settings.data_dir / 'logs'}")
        producer = make_producer(stack.kafka_config)
        spec = _campaign_spec(cid, ds, assay_id, init, batch, budget, learner, policy, seed)
        publish_records(producer, codec, "campaigns", "Campaign", iter([spec.to_record(now_ms())]))
        t = now_ms()
        rows = iter([{"campaign_id": cid, "compound_id": f"P{i:06d}", "smiles": s, "source": ds.name,
                      "event_time": t, "ingest_time": t} for i, s in enumerate(ds.smiles)])
        pub = publish_records(producer, codec, "compounds", "CompoundRegistered", rows)
        producer.close()
        console.print(f"  LIMS     registered {pub.published} compounds")
        oracle = Oracle(dict(zip(ds.smiles, ds.values, strict=True)))
        lab = VirtualLab(RobotClient(stack.kafka_config, codec, robot_id="virtual-robot-1"), oracle,
                         LabConfig(latency_s=lab_latency_s, unit=ds.unit, seed=seed)).start()
        try:
            final = _wait_done(stack, codec, cid, budget, lab, timeout_s, console, progress)
        finally:
            lab.stop()
        client = analyst_client(settings)
        n_readings = -1
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            n_readings = int(client.query(f"SELECT count() FROM readings WHERE campaign_id = '{cid}'").result_rows[0][0])
            n_req = int(client.query(f"SELECT count() FROM requests WHERE campaign_id = '{cid}'").result_rows[0][0])
            if n_readings >= lab.readings_published and n_req >= final["n_requested"]:
                break
            time.sleep(0.5)
        rounds = _score(client, cid, ds, top_k)
        examples = [(title, sql.format(cid=cid), client.query(sql.format(cid=cid)).result_rows) for title, sql in EXAMPLE_SQL]
    return {"campaign_id": cid, "rounds": rounds, "readings_published": lab.readings_published,
            "readings_in_clickhouse": n_readings, "failed": lab.failed, "final": final, "examples": examples}


def run_demo(settings: Settings, *, report: Path | None = None, plot: Path = Path("demo_trajectory.png"),
             seed: int = 0, top_k: int = 100, timeout_s: float = 900, progress: bool = True,
             lab_latency_s: float = 0.0, console: Console | None = None) -> dict[str, Any]:
    """Run the demo campaign; returns the report dict (also written to ``report`` as JSON)."""
    console = console or Console()
    t0 = time.perf_counter()
    ds = enamine10k()
    targets = round_targets(len(ds.smiles), 0.01, 0.01, 5)
    init, budget = targets[0], targets[-1]
    batch = -(-(budget - init) // 5)  # ceil: 5 batches after the random start, the last capped by the budget
    console.print("[bold]labloop demo[/]: MolPAL's protocol on Enamine 10k (1% random start, 5 batches of 1%, "
                  "docking score minimized)")
    run = run_on_stack(settings, ds, init, batch, budget, seed=seed, top_k=top_k, timeout_s=timeout_s,
                       progress=progress, lab_latency_s=lab_latency_s, assay_id="vina-4UNN", console=console)
    rounds, cid, n_readings = run["rounds"], run["campaign_id"], run["readings_in_clickhouse"]
    published = run["readings_published"]
    wall = time.perf_counter() - t0
    pub_res = published_results()
    table = Table(title=f"% of top-{top_k} scores found (Enamine 10k)")
    for col in ("batch", "n acquired", "% pool", "labloop", "random*", "MolPAL RF", "MolPAL NN", "MolPAL MPN"):
        table.add_column(col, justify="right")
    for i, r in enumerate(rounds):
        def ref(key: str, i: int = i) -> str:
            rows = pub_res.get(key, [])
            return f"{rows[i][1]:.1f}±{rows[i][2]:.1f}" if i < len(rows) else "-"
        table.add_row(str(i), str(r["n_acquired"]), f"{100 * r['n_acquired'] / len(ds.smiles):.1f}",
                      f"[bold]{r['pct_topk_scores_found']:.1f}[/]", ref("random"), ref("rf greedy"), ref("nn greedy"),
                      ref("mpn greedy"))
    console.print(table)
    console.print("  * MolPAL's published numbers (mean ± sd over their runs, full retraining, greedy)")
    _plot(rounds, pub_res, plot, len(ds.smiles))
    console.print(f"  plot: {plot}")
    console.print(f"  readings published by the virtual lab: {published}; "
                  f"rows in ClickHouse readings for {cid}: {n_readings}"
                  + ("" if n_readings == published else "  [red](MISMATCH)[/]"))
    console.print(f"  failed experiments (no score): {run['failed']}")
    console.print("\n[bold]Try it yourself[/] (while `labloop up` runs, or now against the embedded store):")
    for title, sql, res in run["examples"]:
        console.print(f"  -- {title}\n  labloop sql \"{sql}\"")
        console.print(f"     -> {res[:3]}{' ...' if len(res) > 3 else ''}")
    result = {"campaign_id": cid, "pool_size": len(ds.smiles), "top_k": top_k, "n_acquired": rounds[-1]["n_acquired"],
              "pct_topk_scores_found": rounds[-1]["pct_topk_scores_found"], "rounds": rounds,
              "readings_published": published, "readings_in_clickhouse": n_readings,
              "failed_experiments": run["failed"], "model_versions": run["final"]["model_version"],
              "learner": DEFAULT_LEARNER, "policy": DEFAULT_POLICY, "wall_s": round(wall, 1)}
    if report:
        report.write_text(json.dumps(result, indent=2))
        console.print(f"  report: {report}")
    console.print(f"  wall time: {wall:.0f}s")
    if n_readings != published:
        raise DemoFailed(f"ClickHouse holds {n_readings} readings for {cid}, the lab published {published}")
    return result
