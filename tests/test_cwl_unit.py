"""The pure parts of building CWL invocations on the workers (sheepdog.cwlbatch)."""

from __future__ import annotations

import copy
import threading
import uuid
from types import SimpleNamespace

from ruamel.yaml.comments import CommentedMap, CommentedSeq

from sheepdog.cwlbatch import Batches, Deferred, batchable, chunks, plain, threads


def test_a_group_goes_in_one_chunk_per_core_none_under_the_fewest():
    group = list(range(10))
    assert [len(c) for c in chunks(group, cores=2, fewest=3)] == [5, 5]
    assert [len(c) for c in chunks(group, cores=4, fewest=3)] == [4, 4, 2]
    assert [len(c) for c in chunks(group, cores=8, fewest=100)] == [10]
    assert sum(chunks(group, cores=3, fewest=1), []) == group  # in order, each once


def _tool(*reqs: dict, inputs: list | None = None, metadata: dict | None = None):
    return SimpleNamespace(requirements=list(reqs), hints=[],
                           tool={"inputs": inputs or [{"id": "x", "type": "string"}]},
                           metadata=metadata or {"cwlVersion": "v1.2"})


def test_only_a_tool_whose_requirements_mean_the_same_on_a_worker_is_batched():
    plain_run = SimpleNamespace(cachedir=None, research_obj=None)
    assert batchable(_tool(), plain_run)
    assert batchable(_tool({"class": "InlineJavascriptRequirement"},
                           {"class": "InplaceUpdateRequirement", "inplaceUpdate": False}),
                     plain_run)
    for refused in ({"class": "DockerRequirement"}, {"class": "ResourceRequirement"},
                    {"class": "InplaceUpdateRequirement", "inplaceUpdate": True},
                    {"class": "http://commonwl.org/cwltool#Secrets"}):
        assert not batchable(_tool(refused), plain_run), refused
    assert not batchable(_tool(inputs=[{"id": "f", "type": "File", "format": "x"}]),
                         plain_run)
    assert not batchable(_tool(metadata={"$schemas": ["s.owl"]}), plain_run)
    assert not batchable(_tool(), SimpleNamespace(cachedir="/c", research_obj=None))


def test_a_long_array_of_the_job_order_becomes_plain_short_ones_keep_positions():
    long = CommentedSeq([CommentedMap(n=i) for i in range(100)])
    short = CommentedSeq(["a", "b"])
    order = CommentedMap(words=long, few=short, one="x")
    made = plain(order)
    assert type(made["words"]) is list and all(type(i) is dict for i in made["words"])
    assert made["words"] == [{"n": i} for i in range(100)]
    assert type(made["few"]) is CommentedSeq and made["one"] == "x"
    assert copy.deepcopy(made) == made


def test_a_tool_is_told_the_cores_its_piece_holds():
    assert threads(0) == threads(1) == {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                                        "MKL_NUM_THREADS": "1"}
    assert threads(4)["OMP_NUM_THREADS"] == "4"


def test_chunked_invocations_are_named_in_order_before_any_chunk_runs(monkeypatch):
    """cwltool names a scatter's invocations say, say_2, ... in order; chunks run in
    threads of their own, so the names are given before any starts (a failing element's
    message names the element that failed, whichever chunk's thread comes first)."""
    stem = f"say{uuid.uuid4().hex[:8]}"
    sent: list[list[str]] = []
    monkeypatch.setattr(Batches, "_run",
                        lambda self, chunk, number, lock: sent.append([d.name for d in chunk]))
    pieces = SimpleNamespace(cores=lambda: 2)
    batches = Batches(pieces, fewest=2, executor=None)  # type: ignore[arg-type]
    tool = _tool()
    for order in range(4):
        batches.add(Deferred(tool, order, print, SimpleNamespace(name=stem)))
    batches.flush(print, threading.Condition())
    for thread in threading.enumerate():
        if thread.name == "cwl-chunk":
            thread.join(10)
    assert sorted(sent) == [[stem, f"{stem}_2"], [f"{stem}_3", f"{stem}_4"]]
