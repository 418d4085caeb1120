"""Precomputed datasets served by `sheepdog serve`: by trait, by region, and a page with
the dataset's progress and, at the end, its QTL map (each trait's top peak along the
genome, each point a link to that trait's Manhattan plot)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, jsonify, render_template_string, request, url_for

from ... import store
from ...errors import FieldError, UnknownJob
from ...workflows.base import WebServices
from ..scan import plot
from . import store as pcstore
from .registry import dataset_dir, datasets

bp = Blueprint("precompute", __name__, url_prefix="/precompute")
PAGE = 100  # hits per page unless ?limit= says otherwise


_SERVICES: list[WebServices] = []  # given by the web service when it takes the routes


def routes(web: WebServices) -> Blueprint:
    """The blueprint, using the web service's Redis client and cookie handling."""
    _SERVICES[:] = [web]
    return bp


def _conn() -> Any:
    return _SERVICES[0].conn()


def _number(name: str) -> float | None:
    raw = request.args.get(name)
    if raw in (None, ""):
        return None
    try:
        value = float(raw)
    except ValueError:
        raise FieldError(name, f"must be a number, got {raw[:40]!r}") from None
    if not math.isfinite(value):
        raise FieldError(name, "must be a finite number")
    return value


def _whole(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw in (None, ""):
        return default
    # ASCII digits only: str.isdigit passes '²', which int() refuses
    if not re.fullmatch(r"[0-9]{1,12}", raw) or not low <= int(raw) <= high:
        raise FieldError(name, f"must be a whole number from {low} to {high}")
    return int(raw)


def _state(name: str) -> dict[str, Any]:
    out, job_id = dataset_dir(_conn(), name)
    try:
        job = store.get_job(_conn(), job_id)
        job_view = {"id": job.id, "status": job.status, "done": job.done, "total": job.total}
    except UnknownJob:
        job_view = {"id": job_id, "status": "expired"}
    has_store = (out / pcstore.DB).is_file()
    return {"name": name, "job": job_view,
            "traits": pcstore.counts(out) if has_store else {},
            "description": pcstore.description(out) if has_store else {}}


@bp.get("")
def list_datasets() -> Any:
    found = []
    for name, entry in sorted(datasets(_conn()).items()):
        out = Path(entry["out"])
        found.append({"name": name, "job": entry["job"],
                      "traits": pcstore.counts(out) if (out / pcstore.DB).is_file() else {}})
    return jsonify(datasets=found)


@bp.get("/<name>")
def get_dataset(name: str) -> Any:
    return jsonify(_state(name))


@bp.get("/<name>/traits/<path:trait>")
def get_trait(name: str, trait: str) -> Any:
    out, _ = dataset_dir(_conn(), name)
    vector = request.args.get("vector", "") in ("1", "true", "yes")
    return jsonify(pcstore.show(out, trait, vector))


@bp.get("/<name>/hits")
def get_hits(name: str) -> Any:
    out, _ = dataset_dir(_conn(), name)
    chrom = request.args.get("chr") or None
    found = pcstore.hits(out, chrom, _number("start"), _number("end"), _number("min"),
                         _whole("limit", PAGE, 1, 1000), _whole("offset", 0, 0, 10**9))
    return jsonify(found)


def _svg(text: str) -> Response:
    return Response(text, mimetype="image/svg+xml")


@bp.get("/<name>/manhattan/<path:trait>")
def trait_manhattan(name: str, trait: str) -> Any:
    out, _ = dataset_dir(_conn(), name)
    found = pcstore.show(out, trait)
    by_chrom: dict[str, tuple[list[float], list[float]]] = {}
    for snp in pcstore.vector_rows(out, found["key"]):
        if snp["logp"] is not None:
            xs, ys = by_chrom.setdefault(snp["chr"], ([], []))
            xs.append(float(snp["ps"]))
            ys.append(abs(snp["logp"]))
    lay = plot.layout_of(by_chrom, f"{trait} ({name})", "-log10 p")
    return _svg(plot.svg(lay))


@bp.get("/<name>/map.svg")
def qtl_map(name: str) -> Any:
    """Every scanned trait's top peak along the genome, each a link to its scan."""
    out, _ = dataset_dir(_conn(), name)
    by_chrom: dict[str, tuple[list[float], list[float]]] = {}
    links: dict[str, list[str]] = {}
    for hit in pcstore.top_hits(out):
        xs, ys = by_chrom.setdefault(hit["chr"], ([], []))
        xs.append(hit["mb"] * 1e6)
        ys.append(hit["logp"])
        links.setdefault(hit["chr"], []).append(
            url_for("precompute.trait_manhattan", name=name, trait=hit["trait"]))
    lay = plot.layout_of(by_chrom, f"{name}: each trait's top peak", "-log10 p", links=links,
                         extents=pcstore.chromosome_lengths(out))
    return _svg(plot.svg(lay))


PAGE_HTML = """{% extends "base.html" %}
{% block title %}sheepdog — {{ name }}{% endblock %}
{% block main %}
<section id="dataset" data-state="{{ url_for('precompute.get_dataset', name=name) }}">
  <h1>precompute <small>{{ name }}</small> <span id="status" class="badge">…</span></h1>
  <p>job <a id="job-link" href="#"></a></p>
  <div class="bar"><div id="bar-fill" style="width: 0%"></div><span id="bar-text">0%</span></div>
  <p id="counts"></p>
  <div id="map" hidden><h2>QTL map</h2>
    <object id="map-svg" type="image/svg+xml" aria-label="QTL map"></object></div>
</section>
<script>
(function () {
  const root = document.getElementById("dataset");
  async function tick() {
    const r = await fetch(root.dataset.state, {credentials: "same-origin"});
    if (!r.ok) { setTimeout(tick, 2000); return; }
    const s = await r.json();
    const t = s.traits, total = Object.values(t).reduce((a, b) => a + b, 0);
    const settled = total - (t.queued || 0);
    const pct = total ? Math.round(100 * settled / total) : 0;
    document.getElementById("bar-fill").style.width = pct + "%";
    document.getElementById("bar-text").textContent = pct + "%";
    document.getElementById("counts").textContent = Object.entries(t)
      .map(([k, v]) => v + " " + k).join(", ");
    const status = document.getElementById("status");
    status.textContent = s.job.status;
    status.className = "badge " + s.job.status;
    const link = document.getElementById("job-link");
    link.textContent = s.job.id;
    link.href = "/jobs/" + encodeURIComponent(s.job.id) + "/page";
    if (["success", "error", "cancelled", "expired"].includes(s.job.status)) {
      document.getElementById("map").hidden = false;
      document.getElementById("map-svg").data = "{{ url_for('precompute.qtl_map', name=name) }}";
      return;
    }
    setTimeout(tick, 1000);
  }
  tick();
})();
</script>
{% endblock %}
"""


@bp.get("/<name>/page")
def dataset_page(name: str) -> Any:
    moved = _SERVICES[0].token_to_cookie()
    if moved is not None:
        return moved
    dataset_dir(_conn(), name)  # 404 for an unknown dataset
    return render_template_string(PAGE_HTML, name=name)
