"""The web dashboard: campaigns, their progress and accuracy, and the approval queue.

Server-rendered pages (Starlette), read from ClickHouse with the same client analysts use;
charts are inline SVG drawn here and structures RDKit's SVG depictions, so a page needs no
script and no other server. Pages:

- ``/``: every campaign: budget, requested, in flight, measured, best value, model version and
  live error, proposals waiting, done.
- ``/campaign/{id}``: the best-so-far trajectory against the number of experiments, the request
  funnel and lifecycle times, prospective accuracy per model version, the best compounds and
  the next ones requested, with structures, and its approval queue.
- ``/approvals``: every proposal waiting for a decision, with approve / reject / priority forms.
- ``/request/{id}``: why it was requested (``labloop explain``) and the decisions on it.
- ``POST /decide``: a decision from those forms, published as a ``Decision`` event.

Nothing here executes what it reads: every value is escaped, SMILES are depicted only up to
``MAX_DEPICT_CHARS``, and a form must carry the token of the page it came from (a page on
another site cannot post decisions through the chemist's browser).
"""

from __future__ import annotations

import html
import json
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qs, quote

import numpy as np
from clickhouse_connect.driver.client import Client
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from labloop.consumers.approval import ApprovalError, decision_record, decisions_of, pending_counts, pending_proposals
from labloop.consumers.tables import sql_string
from labloop.models.pareto import nondominated_layers, to_min
from labloop.schemas.types import Record

__all__ = ["MAX_DEPICT_CHARS", "create_dashboard", "depict", "line_chart"]

log = logging.getLogger("labloop.dashboard")
MAX_DEPICT_CHARS = 400  # SMILES longer than this are shown as text: RDKit holds the interpreter while it parses
MAX_FORM_BYTES = 16_384

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:.5rem 0 1.5rem}th,td{border-bottom:1px solid #ddd;padding:.3rem .6rem;text-align:left;vertical-align:middle}
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
.mol{width:180px;height:130px}.badge{padding:.1rem .4rem;border-radius:.3rem;background:#eee}
.done{background:#d6f5d6}.wait{background:#fde9c8}form{display:inline;margin:0}input[type=text]{width:12rem}
h1 a{color:inherit;text-decoration:none}.grid{display:flex;flex-wrap:wrap;gap:2rem}
"""


def _e(v: object) -> str:
    return html.escape("" if v is None else str(v))


def _num(v: object, fmt: str = ".4g") -> str:
    if v is None or isinstance(v, float) and not math.isfinite(v):
        return "–"
    return format(v, fmt) if isinstance(v, int | float) else _e(v)


def depict(smiles: str, width: int = 180, height: int = 130) -> str:
    """An inline SVG of ``smiles`` (RDKit), or the SMILES as escaped text when it is too long or
    does not parse."""
    if len(smiles) > MAX_DEPICT_CHARS:
        return f"<code>{_e(smiles[:60])}…</code>"
    from rdkit import Chem, RDLogger
    from rdkit.Chem.Draw import rdMolDraw2D

    RDLogger.DisableLog("rdApp.*")  # type: ignore[attr-defined]
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        return f"<code>{_e(smiles)}</code>"
    d = rdMolDraw2D.MolDraw2DSVG(width, height)
    d.DrawMolecule(mol)
    d.FinishDrawing()
    svg = d.GetDrawingText()
    return svg[svg.index("<svg"):].replace("<svg", f'<svg class="mol" role="img" aria-label="{_e(smiles)}"', 1)


def line_chart(series: Sequence[tuple[str, Sequence[float], Sequence[float]]], title: str, x_label: str,
               y_label: str, width: int = 520, height: int = 260, points: bool = False) -> str:
    """An SVG chart of ``(name, xs, ys)`` series (lines, or dots with ``points``); NaNs are left out."""
    pts = [(x, y) for _, xs, ys in series for x, y in zip(xs, ys, strict=True) if math.isfinite(x) and math.isfinite(y)]
    if not pts:
        return f"<p><em>{_e(title)}: no data yet</em></p>"
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    L, R, T, B = 60, 12, 24, 40
    def sx(x: float) -> float:
        return L + (x - x0) / (x1 - x0) * (width - L - R)

    def sy(y: float) -> float:
        return height - B - (y - y0) / (y1 - y0) * (height - T - B)

    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    out = [f'<svg width="{width}" height="{height}" role="img" aria-label="{_e(title)}">',
           f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{_e(title)}</text>',
           f'<line x1="{L}" y1="{height - B}" x2="{width - R}" y2="{height - B}" stroke="#888"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{height - B}" stroke="#888"/>']
    for k in range(5):
        xv, yv = x0 + (x1 - x0) * k / 4, y0 + (y1 - y0) * k / 4
        out.append(f'<text x="{sx(xv):.1f}" y="{height - B + 14}" text-anchor="middle" font-size="10">{xv:.4g}</text>')
        out.append(f'<text x="{L - 4}" y="{sy(yv) + 3:.1f}" text-anchor="end" font-size="10">{yv:.4g}</text>')
    out.append(f'<text x="{width / 2}" y="{height - 6}" text-anchor="middle" font-size="11">{_e(x_label)}</text>')
    out.append(f'<text x="12" y="{height / 2}" font-size="11" transform="rotate(-90 12 {height / 2})" '
               f'text-anchor="middle">{_e(y_label)}</text>')
    for i, (name, xs, ys) in enumerate(series):
        c = colors[i % len(colors)]
        xy = [(sx(x), sy(y)) for x, y in zip(xs, ys, strict=True) if math.isfinite(x) and math.isfinite(y)]
        if points:
            out.extend(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.5" fill="{c}"/>' for a, b in xy)
        else:
            out.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" '
                       f'points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in xy)}"/>')
        out.append(f'<text x="{width - R - 4}" y="{T + 14 * (i + 1)}" text-anchor="end" font-size="11" fill="{c}">'
                   f'{_e(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    """Cells are HTML already (escaped by the caller)."""
    if not rows:
        return "<p><em>none</em></p>"
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _rows(client: Client, sql: str) -> list[dict[str, Any]]:
    res = client.query(sql)
    return [dict(zip(res.column_names, r, strict=True)) for r in res.result_rows]


class _Pages:
    def __init__(self, client: Callable[[], Client], publish: Callable[[Record], None],
                 explain: Callable[[Client, str], dict[str, Any]] | None, title: str) -> None:
        self._client, self.publish, self.explain, self.title = client, publish, explain, title
        self.token = secrets.token_urlsafe(24)  # forms carry it back; another site's page cannot know it
        self._local = threading.local()

    @property
    def client(self) -> Client:
        # clickhouse-connect clients hold one session each: one per server thread.
        c = getattr(self._local, "client", None)
        if c is None:
            c = self._local.client = self._client()
        return c

    def page(self, heading: str, body: str, status: int = 200) -> HTMLResponse:
        nav = '<p><a href="/">campaigns</a> · <a href="/approvals">approval queue</a></p>'
        return HTMLResponse(f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(heading)} · {_e(self.title)}"
                            f"</title><style>{_CSS}</style></head><body><h1>{_e(heading)}</h1>{nav}{body}"
                            f"<p style='color:#888'>rendered {time.strftime('%Y-%m-%d %H:%M:%S')}</p></body></html>",
                            status_code=status)

    # ---- pages ----------------------------------------------------------------------------
    def campaigns(self, request: Request) -> Response:
        c = self.client
        waiting = pending_counts(c)
        rows = []
        for r in _rows(c, "SELECT * FROM campaign_progress ORDER BY campaign_id"):
            cid = r["campaign_id"]
            state = '<span class="badge done">done</span>' if r["done"] else '<span class="badge">running</span>'
            rows.append([f'<a href="/campaign/{quote(cid, safe="")}">{_e(cid)}</a>', state, _num(r["budget"]),
                         _num(r["requested"]), _num(r["in_flight"]), _num(r["measured"]), _num(r["best_value"]),
                         _num(r["model_version"]), _num(r["live_rmse"]),
                         f'<span class="badge wait">{waiting[cid]}</span>' if waiting.get(cid) else "0"])
        return self.page("Campaigns", _table(["campaign", "state", "budget", "requested", "in flight", "measured",
                                              "best", "model", "live RMSE", "proposals waiting"], rows, "campaigns"))

    def campaign(self, request: Request) -> Response:
        cid = request.path_params["campaign_id"]
        c, q = self.client, sql_string(cid)
        defs = _rows(c, f"SELECT * FROM campaigns WHERE campaign_id = {q} ORDER BY event_time DESC LIMIT 1")
        if not defs:
            return self.page("Not found", f"<p>No campaign {_e(cid)}.</p>", 404)
        d = defs[0]
        minimize = d["direction"] == "MINIMIZE"
        prog = (_rows(c, f"SELECT * FROM campaign_progress WHERE campaign_id = {q}") or [{}])[0]
        summary = _table(["budget", "requested", "in flight", "measured", "best", "model", "live RMSE", "90% coverage",
                          "done"], [[_num(prog.get("budget")), _num(prog.get("requested")), _num(prog.get("in_flight")),
                                     _num(prog.get("measured")), _num(prog.get("best_value")),
                                     _num(prog.get("model_version")), _num(prog.get("live_rmse")),
                                     _num(prog.get("live_coverage90"), ".0%"), "yes" if prog.get("done") else "no"]],
                         "summary")
        try:
            more = json.loads(d.get("objectives") or "[]")
        except ValueError:
            more = []
        extra = "".join(f", {'subject to ' if o['goal'] in ('AT_MOST', 'AT_LEAST') else ''}<b>{_e(o['assay_id'])}</b> "
                        + {"MINIMIZE": "minimized", "MAXIMIZE": "maximized", "AT_MOST": f"&le; {_num(o['bound'])}",
                           "AT_LEAST": f"&ge; {_num(o['bound'])}"}.get(o["goal"], "") for o in more)
        head = (f"<p>{'minimize' if minimize else 'maximize'} <b>{_e(d['objective_assay_id'])}</b> ({_e(d['unit'])}){extra}; "
                f"policy {_e(d['policy'])}, learner {_e(d['learner'])}, batches of {_num(d['batch_size'])}, "
                f"{'approval required' if d.get('approval') else 'no approval step'}</p>")
        # Best so far against experiments: the objective's accepted readings in the order they arrived.
        vals = [r["value"] for r in _rows(c, (
            f"SELECT value FROM accepted_readings WHERE campaign_id = {q} AND assay_id = {sql_string(d['objective_assay_id'])} "
            "ORDER BY event_time, reading_id LIMIT 1 BY reading_id LIMIT 100000"))]
        best: list[float] = []
        for v in vals:
            best.append(v if not best else (min(best[-1], v) if minimize else max(best[-1], v)))
        n = list(range(1, len(vals) + 1))
        traj = line_chart([("best so far", n, best), ("each result", n, vals)], "Best so far", "experiments",
                          f"{d['objective_assay_id']} ({d['unit']})")
        models = _rows(c, (
            f"SELECT model_version, argMax(live_n, event_time) AS n, argMax(live_rmse, event_time) AS rmse, "
            f"argMax(live_nll, event_time) AS nll, argMax(live_coverage90, event_time) AS cov, "
            f"argMax(live_spearman, event_time) AS rho, argMax(n_train, event_time) AS n_train FROM model_updates "
            f"WHERE campaign_id = {q} GROUP BY model_version ORDER BY model_version"))
        scored = [m for m in models if m["n"]]
        acc = line_chart([("live RMSE", [m["model_version"] for m in scored],
                           [math.nan if m["rmse"] is None else m["rmse"] for m in scored])],
                         "Prospective accuracy", "model version", f"RMSE on later readings ({d['unit']})", points=True)
        acc_table = _table(["model", "trained on", "scored readings", "RMSE", "Gaussian NLL", "90% coverage", "Spearman"],
                           [[_num(m["model_version"]), _num(m["n_train"]), _num(m["n"]), _num(m["rmse"]), _num(m["nll"]),
                             _num(m["cov"], ".0%"), _num(m["rho"], ".3f")] for m in scored[-12:]], "accuracy")
        return self.page(f"Campaign {cid}", head + summary + f'<div class="grid">{traj}{acc}{self._front(c, q, d)}</div>'
                         + acc_table
                         + self._funnel(c, q) + self._compounds(c, q, d, minimize)
                         + "<h2>Approval queue</h2>" + self._queue(pending_proposals(c, cid), f"/campaign/{quote(cid)}"))

    def _front(self, c: Client, q: str, d: dict[str, Any]) -> str:
        """For several objectives: the measured compounds on the first two, the Pareto front found
        so far (among those meeting every constraint) drawn apart."""
        try:
            more = json.loads(d.get("objectives") or "[]")
        except ValueError:
            return ""
        objs = [(d["objective_assay_id"], d["direction"] == "MAXIMIZE")] + \
            [(o["assay_id"], o["goal"] == "MAXIMIZE") for o in more if o.get("goal") in ("MINIMIZE", "MAXIMIZE")]
        cons = [o for o in more if o.get("goal") in ("AT_MOST", "AT_LEAST") and o.get("bound") is not None]
        if len(objs) < 2:
            return ""
        assays = [a for a, _ in objs] + [o["assay_id"] for o in cons]
        rows = _rows(c, (
            f"SELECT compound_id, assay_id, avg(value) AS v FROM accepted_readings WHERE campaign_id = {q} AND assay_id IN "
            f"({', '.join(sql_string(a) for a in assays)}) GROUP BY compound_id, assay_id"))
        vals: dict[str, dict[str, float]] = {}
        for r in rows:
            vals.setdefault(r["compound_id"], {})[r["assay_id"]] = float(r["v"])
        full = [v for v in vals.values() if all(a in v for a in assays)]
        ok = [v for v in full if all(v[o["assay_id"]] <= o["bound"] if o["goal"] == "AT_MOST" else v[o["assay_id"]] >= o["bound"]
                                     for o in cons)]
        front: list[dict[str, float]] = []
        if ok:
            Z = to_min(np.array([[v[a] for a, _ in objs] for v in ok]), [m for _, m in objs])
            front = [ok[i] for i in np.flatnonzero(nondominated_layers(Z) == 0)]
            front.sort(key=lambda v: v[objs[0][0]])
        (a0, _), (a1, _) = objs[0], objs[1]
        bad = [v for v in full if v not in ok]
        return line_chart([("measured", [v[a0] for v in ok], [v[a1] for v in ok]),
                           ("Pareto front", [v[a0] for v in front], [v[a1] for v in front]),
                           ("infeasible", [v[a0] for v in bad], [v[a1] for v in bad])],
                          f"Pareto front found ({len(front)} of {len(ok)} feasible)", a0, a1, points=True)

    def _funnel(self, c: Client, q: str) -> str:
        f = _rows(c, (
            f"SELECT (SELECT uniqExact(request_id) FROM proposals WHERE campaign_id = {q}) AS proposed, "
            f"(SELECT uniqExactIf(request_id, action = 'APPROVE') FROM decisions WHERE campaign_id = {q}) AS approved, "
            f"(SELECT uniqExactIf(request_id, action = 'REJECT') FROM decisions WHERE campaign_id = {q}) AS rejected, "
            f"(SELECT uniqExact(request_id) FROM requests WHERE campaign_id = {q}) AS requested"))[0]
        st = {r["status"]: r["n"] for r in _rows(c, f"SELECT status, uniqExact(request_id) AS n FROM request_status "
                                                    f"WHERE campaign_id = {q} GROUP BY status")}
        life = _rows(c, (
            f"SELECT quantileExact(0.5)(dateDiff('millisecond', requested_at, accepted_at)) / 1000 AS to_accept, "
            f"quantileExact(0.5)(dateDiff('millisecond', requested_at, finished_at)) / 1000 AS to_finish, "
            f"quantileExact(0.9)(dateDiff('millisecond', requested_at, finished_at)) / 1000 AS to_finish90 "
            f"FROM request_lifecycle WHERE campaign_id = {q} AND finished_at IS NOT NULL"))[0]
        stages = [("proposed", f["proposed"]), ("approved", f["approved"]), ("rejected", f["rejected"]),
                  ("requested", f["requested"])] + [(s.lower(), st.get(s, 0)) for s in
                                                     ("ACCEPTED", "STARTED", "COMPLETED", "FAILED", "EXPIRED")]
        return ("<h2>Request funnel</h2>" + _table([s for s, _ in stages], [[_num(v) for _, v in stages]], "funnel")
                + f"<p>median time to accepted {_num(life['to_accept'], '.2f')} s, to finished "
                  f"{_num(life['to_finish'], '.2f')} s (90th percentile {_num(life['to_finish90'], '.2f')} s)</p>")

    def _compounds(self, c: Client, q: str, d: dict[str, Any], minimize: bool) -> str:
        best = _rows(c, (
            f"SELECT r.compound_id AS compound_id, any(m.smiles) AS smiles, {'min' if minimize else 'max'}(r.value) AS value, "
            f"any(r.request_id) AS request_id FROM accepted_readings AS r LEFT JOIN (SELECT compound_id, any(smiles) AS smiles "
            f"FROM compounds WHERE campaign_id = {q} GROUP BY compound_id) AS m ON r.compound_id = m.compound_id "
            f"WHERE r.campaign_id = {q} AND r.assay_id = {sql_string(d['objective_assay_id'])} GROUP BY r.compound_id "
            f"ORDER BY value {'ASC' if minimize else 'DESC'} LIMIT 8"))
        nxt = _rows(c, (
            f"SELECT request_id, compound_id, smiles, priority, predicted_mean, predicted_std, model_version FROM requests "
            f"WHERE campaign_id = {q} AND request_id NOT IN (SELECT request_id FROM request_status WHERE campaign_id = {q} "
            f"AND status IN ('COMPLETED', 'FAILED', 'EXPIRED')) ORDER BY sequence DESC LIMIT 8"))
        return ("<h2>Best compounds</h2>" + _table(["structure", "compound", "value", "request"], [
                    [depict(r["smiles"] or ""), _e(r["compound_id"]), _num(r["value"]), self._req_link(r["request_id"])]
                    for r in best], "best")
                + "<h2>Requested next (in flight)</h2>" + _table(["structure", "compound", "priority", "predicted", "model",
                                                                  "request"], [
                    [depict(r["smiles"]), _e(r["compound_id"]), _num(r["priority"]), _pred(r),
                     _num(r["model_version"]), self._req_link(r["request_id"])] for r in nxt], "next"))

    @staticmethod
    def _req_link(rid: str | None) -> str:
        return "–" if not rid else f'<a href="/request/{quote(rid, safe="")}">{_e(rid)}</a>'

    def _queue(self, rows: list[dict[str, Any]], back: str) -> str:
        if not rows:
            return "<p><em>no proposal is waiting</em></p>"
        tok, nxt = _e(self.token), _e(back)

        def forms(r: dict[str, Any]) -> str:
            rid = _e(r["request_id"])
            common = (f'<input type="hidden" name="token" value="{tok}"><input type="hidden" name="next" value="{nxt}">'
                      f'<input type="hidden" name="request_id" value="{rid}">')
            return (f'<form method="post" action="/decide" class="approve">{common}<input type="hidden" name="action" '
                    f'value="APPROVE"><input type="text" name="by" placeholder="your name" required> '
                    f'<button type="submit">approve</button></form><br>'
                    f'<form method="post" action="/decide" class="reject">{common}<input type="hidden" name="action" '
                    f'value="REJECT"><input type="text" name="by" placeholder="your name" required> '
                    f'<input type="text" name="reason" placeholder="reason" required> <button type="submit">reject</button>'
                    f'</form><br><form method="post" action="/decide" class="prioritize">{common}<input type="hidden" '
                    f'name="action" value="PRIORITIZE"><input type="text" name="by" placeholder="your name" required> '
                    f'<input type="number" name="priority" min="0" value="{int(r["priority"])}" style="width:5rem"> '
                    f'<button type="submit">set priority</button></form>')

        return _table(["structure", "request", "campaign", "compound", "priority", "predicted", "score", "decide"], [
            [depict(r["smiles"]), self._req_link(r["request_id"]), _e(r["campaign_id"]), _e(r["compound_id"]),
             _num(r["priority"]), _pred(r), _num(r["acquisition_score"]), forms(r)] for r in rows], "queue")

    def approvals(self, request: Request) -> Response:
        rows = pending_proposals(self.client)
        return self.page("Approval queue", f"<p>{len(rows)} proposal(s) waiting</p>" + self._queue(rows, "/approvals"))

    def request(self, request: Request) -> Response:
        rid = request.path_params["request_id"]
        c = self.client
        body = ""
        if self.explain is not None:
            try:
                e = self.explain(c, rid)
            except Exception as exc:  # a named error from explain; the page says it
                return self.page("Not found", f"<p>{_e(exc)}</p>", 404)
            r, tr = e["request"], e["training_readings"]
            body += depict(r["smiles"]) + _table(["campaign", "compound", "batch", "priority", "policy", "score",
                                                  "predicted", "model", "learned from"], [[
                f'<a href="/campaign/{quote(r["campaign_id"], safe="")}">{_e(r["campaign_id"])}</a>', _e(r["compound_id"]),
                _num(r["batch"]), _num(r["priority"]), _e(r["policy"]), _num(r["acquisition_score"]), _pred(r),
                "random start" if not r["model_version"] else _num(r["model_version"]),
                f"{_num(tr['readings'])} readings of {_num(tr['compounds'])} compounds"]], "explain")
            out = e["outcome"]
            body += (f"<p>outcome: {_e(', '.join(s for s, _ in out['statuses']) or 'no status yet')}"
                     + "".join(f"; measured {_num(v)} {_e(u)}" for v, u, _ in out["readings"]) + "</p>")
        decisions = decisions_of(c, rid)
        body += "<h2>Decisions</h2>" + _table(["when", "action", "by", "priority", "reason"], [
            [_e(d["event_time"]), _e(d["action"].lower()), _e(d["decided_by"]), _num(d["priority"]), _e(d["reason"])]
            for d in decisions], "decisions")
        return self.page(f"Request {rid}", body)

    async def decide(self, request: Request) -> Response:
        raw = await request.body()
        if len(raw) > MAX_FORM_BYTES:
            return self.page("Refused", "<p>form too large</p>", 413)
        form = {k: v[0] for k, v in parse_qs(raw.decode("utf-8", "replace")).items()}
        if not secrets.compare_digest(form.get("token", ""), self.token):
            return self.page("Refused", "<p>this form did not come from this dashboard (reload the page)</p>", 403)
        try:
            prio = int(form["priority"]) if form.get("priority", "").strip() else None
        except ValueError:
            return self.page("Refused", f"<p>priority {_e(form.get('priority'))} is not a whole number</p>", 400)
        from starlette.concurrency import run_in_threadpool

        try:
            rec = await run_in_threadpool(lambda: decision_record(
                self.client, form.get("request_id", ""), form.get("action", ""), form.get("by", ""),
                int(time.time() * 1000), form.get("reason"), prio))
            await run_in_threadpool(self.publish, rec)
        except ApprovalError as exc:
            return self.page("Refused", f"<p>{_e(exc)}</p>", 400)
        log.info("%s %s by %s", rec["action"].lower(), rec["request_id"], rec["decided_by"])
        back = form.get("next", "/")
        if not back.startswith("/") or back.startswith("//"):  # only back into this dashboard
            back = "/"
        return RedirectResponse(back + ("&" if "?" in back else "?") + f"decided={quote(rec['request_id'])}",
                                status_code=303)


def _pred(r: dict[str, Any]) -> str:
    m, s = r.get("predicted_mean"), r.get("predicted_std")
    return "random start" if m is None else f"{_num(m)} ± {_num(s, '.2g')}"


def create_dashboard(client: Callable[[], Client], publish: Callable[[Record], None],
                     explain: Callable[[Client, str], dict[str, Any]] | None = None, title: str = "labloop") -> Starlette:
    """The dashboard's ASGI app.

    Args:
        client: makes a ClickHouse client (one is made per server thread).
        publish: sends a ``Decision`` record to the decisions topic and waits for the broker's ack.
        explain: ``labloop explain``'s function (``client, request_id -> dict``) for request pages.
    """
    p = _Pages(client, publish, explain, title)
    return Starlette(routes=[
        Route("/", p.campaigns), Route("/campaign/{campaign_id:path}", p.campaign), Route("/approvals", p.approvals),
        Route("/request/{request_id:path}", p.request), Route("/decide", p.decide, methods=["POST"]),
        Route("/healthz", lambda r: Response("ok"))])
