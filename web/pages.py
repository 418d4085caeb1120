"""The browser pages: recent jobs, and one job's live progress."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, render_template

from sheepdog import progress, store

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
    job = store.get_job(state.conn(), job_id)
    return render_template("job.html", job=job, token=auth.page_token())
