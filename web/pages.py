"""The browser pages: recent jobs, and one job's live progress."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, render_template

from sheepdog import logs, progress, store

from . import auth, state

bp = Blueprint("pages", __name__)


@bp.get("/")
def index() -> Any:
    moved = auth.token_to_cookie()
    if moved is not None:
        return moved
    conn = state.conn()
    jobs = [progress.job_view(conn, j, with_pieces=False) for j in store.list_jobs(conn, 50)]
    return render_template("index.html", jobs=jobs, token=auth.page_token())


@bp.get("/jobs/<job_id>/page")
def job_page(job_id: str) -> Any:
    moved = auth.token_to_cookie()
    if moved is not None:
        return moved
    conn = state.conn()
    job = store.get_job(conn, job_id)
    # drawn as it stands now, so the page says it without its script (a screenshot, a
    # reader, a browser with script off); the script then takes over, live
    view = progress.job_view(conn, job, with_pieces=False)
    return render_template("job.html", job=job, view=view, lines=logs.last(conn, job_id),
                           token=auth.page_token())
