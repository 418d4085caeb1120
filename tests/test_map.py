"""`sheepdog map`: items, placeholders, chunks, cache, sample, failures, gather in input
order, results by key — through the real CLI on a real Redis."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from conftest import sheepdog, wait_for

from sheepdog.errors import InputError
from sheepdog.mapping import items


def _items(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]


def test_gnu_parallels_placeholders_mean_what_they_mean_there():
    item = items.Item(7, "k", "/data/dir/sample.tar.gz", {})
    argv = items.render(["x{}", "{#}", "{/}", "{//}", "{.}", "{/.}"], item, set())
    assert argv == [["x/data/dir/sample.tar.gz"], ["7"], ["sample.tar.gz"], ["/data/dir"],
                    ["/data/dir/sample.tar"], ["sample.tar"]]
    row = items.Item(1, "a1", "a1,CCO", {"id": "a1", "smiles": "CCO"})
    assert items.render(["model", "--id={id}", "{smiles}"], row, set()) == [
        ["model"], ["--id=a1"], ["CCO"]]


def test_a_command_without_placeholders_gets_the_item_last():
    template = ["echo", "hello"]
    items.check_template(template, None, files=False)
    assert template == ["echo", "hello", "{}"]
    as_is = ["echo", "hello"]  # -N0: GNU parallel's "read one item, insert none"
    items.check_template(as_is, None, files=False, append=False)
    assert as_is == ["echo", "hello"]


def test_n0_runs_the_command_as_it_is_and_each_item_still_sees_its_key(env, tmp_path):
    """-N0, in a chunk big enough to run as one process (one environment reused for its
    items) and one item per piece: no argument is added, $SHEEPDOG_ITEM_KEY differs."""
    script = 'echo "$SHEEPDOG_ITEM_KEY $#"'
    for chunk, n0 in (("20", ["-N0"]), ("1", ["-N", "0"]), ("20", [])):
        r = sheepdog("map", "--range", "1:20", "--chunk", chunk, *n0, "--out", f"o{chunk}{n0}",
                     "--", "sh", "-c", script, "sh", env=env, cwd=str(tmp_path), timeout=120)
        assert r.returncode == 0, r.stderr
        records = _items(tmp_path / f"o{chunk}{n0}")
        args = 0 if n0 else 1
        assert [x["output"] for x in records] == [f"{n} {args}\n" for n in range(1, 21)]
    wrong = sheepdog("map", "--range", "1:2", "-N", "2", "--", "true", env=env,
                     cwd=str(tmp_path))
    assert wrong.returncode == 2 and "-N" in wrong.stderr


@pytest.mark.parametrize(("content", "args", "message"), [
    (None, {}, "no such items file"),
    (b"", {}, "the items file is empty"),
    (b"ok\n\xff\xfe\n", {}, "line 2: not UTF-8 text"),
    (b"a\nb\na\n", {}, "line 3: duplicate key 'a' (first at"),
    (b"id,x\n1,2\n", {"key": "name"}, "line 1: --key 'name' is not a column"),
    (b"id,x\n1,2\n1,3\n", {"key": "id"}, "line 3: duplicate key '1'"),
    (b"id,x\n1,2,3\n", {"key": "id"}, "line 2: 3 fields, but the header has 2"),
])
def test_bad_items_files_are_named_with_file_and_line(tmp_path, content, args, message):
    path = tmp_path / ("items.csv" if args else "items.txt")
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=re.escape(message)) as e:
        items.read_items(path, **args)
    assert str(path) in str(e.value)


def test_unknown_placeholders_and_oversized_samples_are_refused():
    with pytest.raises(InputError, match=r"unknown placeholder \{itme\}: the columns are id"):
        items.check_template(["echo", "{itme}"], ["id"], files=False)
    with pytest.raises(InputError, match="only a CSV/TSV with a header has named columns"):
        items.check_template(["echo", "{id}"], None, files=False)
    with pytest.raises(InputError, match="5 is more than the 3 items"):
        items.sample(items.read_range("1:3"), 5, 0)
    assert items.sample(items.read_range("1:100"), 5, 7) == items.sample(
        items.read_range("1:100"), 5, 7)


def test_items_come_back_in_input_order_with_failures_kept(env, tmp_path):
    (tmp_path / "traits.txt").write_text("t1\nt2\nt3\nt4\n")
    r = sheepdog("map", "--items", "traits.txt", "--out", "out", "--",
                 "sh", "-c", 'sleep 0.$((5 - {#})); echo "{} is {#}"; test {} != t3 || '
                 '{ echo broke >&2; exit 3; }', env=env, cwd=str(tmp_path))
    assert r.returncode == 1, r.stderr
    assert "1 of 4 items failed: t3" in r.stderr
    # said by the job, not as "piece 'gather' failed", and not four times over
    assert "piece 'gather'" not in r.stderr and r.stderr.count("items failed") <= 3
    assert "sheepdog: job" not in r.stderr  # the log's closing line said it already
    records = _items(tmp_path / "out")
    assert [x["key"] for x in records] == ["t1", "t2", "t3", "t4"]
    assert [x["status"] for x in records] == ["success", "success", "failed", "success"]
    assert records[0]["output"] == "t1 is 1\n" and records[3]["output"] == "t4 is 4\n"
    assert records[2]["exit_code"] == 3 and records[2]["stderr"] == "broke"


def test_chunks_record_each_item_on_its_own(env, tmp_path):
    r = sheepdog("map", "--range", "1:10", "--chunk", "4", "--out", "out", "--json", "--",
                 "sh", "-c", "echo {}; exit $(({} % 3 == 0))", env=env, cwd=str(tmp_path))
    assert r.returncode == 1
    view = json.loads(r.stdout)
    assert view["progress"]["total"] == 4  # three chunks and the gather
    records = _items(tmp_path / "out")
    assert [x["exit_code"] for x in records] == [0, 0, 1, 0, 0, 1, 0, 0, 1, 0]
    assert [x["output"] for x in records] == [f"{n}\n" for n in range(1, 11)]


def test_many_items_without_chunk_are_packed_yet_each_recorded_in_its_own_directory(
        env, tmp_path):
    """450 items without --chunk run as 150 pieces of 3; every item still has its own
    record and its own (fresh, empty) directory, whose files come back as its own."""
    script = ('echo {} $(ls -A "$SHEEPDOG_ITEM_DIR" | wc -l); '
              '[ $(({} % 100)) != 0 ] || echo mine > "$SHEEPDOG_ITEM_DIR/f"; '
              '[ {} != 222 ] || [ -e fixed ] || exit 3')
    r = sheepdog("map", "--range", "1:450", "--out", "out", "--json", "--", "sh", "-c",
                 script, env=env, cwd=str(tmp_path), timeout=120)
    assert r.returncode == 1
    view = json.loads(r.stdout)
    assert view["progress"]["total"] == 151  # 150 pieces and the gather
    records = _items(tmp_path / "out")
    assert [x["output"] for x in records] == [f"{n} 0\n" for n in range(1, 451)]
    assert [x["key"] for x in records if x["status"] != "success"] == ["222"]
    assert [x["key"] for x in records if x["files"]] == ["100", "200", "300", "400"]
    for n in (100, 200, 300, 400):
        assert (tmp_path / "out" / "files" / str(n) / "f").read_text() == "mine\n"
    assert not (tmp_path / "out" / "files" / "101").exists()
    # a retry keeps the packed pieces that succeeded and runs the failed item alone
    (tmp_path / "fixed").write_text("")
    again = sheepdog("map", "--retry-failed", view["id"], "--out", "out2", "--json",
                     env=env, cwd=str(tmp_path), timeout=120)
    assert again.returncode == 0, again.stderr
    progress = json.loads(again.stdout)["progress"]
    assert progress["items"]["done"] == 1 and progress["cached"] == 150
    assert [x["status"] for x in _items(tmp_path / "out2")] == ["success"] * 450


def test_the_automatic_chunk_packs_only_beyond_200_items_and_never_with_cache():
    from sheepdog.mapping.build import MapRequest, chunk_size
    made = [items.Item(i + 1, str(i + 1), str(i + 1), {}) for i in range(10_000)]
    assert chunk_size(MapRequest(["true"], made[:200])) == 1
    assert chunk_size(MapRequest(["true"], made[:201])) == 2
    assert chunk_size(MapRequest(["true"], made)) == 50
    assert chunk_size(MapRequest(["true"], made * 30)) == 1000  # at most 1,000 per piece
    assert chunk_size(MapRequest(["true"], made, cache=True)) == 1
    assert chunk_size(MapRequest(["true"], made, chunk=7, cache=True)) == 7


def test_cache_reruns_only_new_or_changed_items(env, tmp_path):
    items_file = tmp_path / "items.txt"
    items_file.write_text("a\nb\nc\n")
    ran = tmp_path / "ran.txt"
    command = ["sh", "-c", f"echo {{}} >> {ran}; echo out-{{}}"]
    assert sheepdog("map", "--items", "items.txt", "--cache", "--", *command, env=env,
                    cwd=str(tmp_path)).returncode == 0
    items_file.write_text("a\nb\nc\nd\n")
    r = sheepdog("map", "--items", "items.txt", "--cache", "--out", "out", "--", *command,
                 env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    ran_items = ran.read_text().split()
    assert sorted(ran_items[:3]) == ["a", "b", "c"] and ran_items[3:] == ["d"]  # d alone
    assert [x["output"] for x in _items(tmp_path / "out")] == [
        "out-a\n", "out-b\n", "out-c\n", "out-d\n"]
    # without --cache every item runs again
    assert sheepdog("map", "--items", "items.txt", "--", *command, env=env,
                    cwd=str(tmp_path)).returncode == 0
    assert len(ran.read_text().split()) == 8


def test_a_sample_is_reproducible_and_in_input_order(env, tmp_path):
    outs = []
    for name in ("one", "two"):
        r = sheepdog("map", "--range", "1:200", "--sample", "7", "--seed", "11", "--out",
                     name, "--", "echo", env=env, cwd=str(tmp_path))
        assert r.returncode == 0, r.stderr
        outs.append([x["key"] for x in _items(tmp_path / name)])
    assert outs[0] == outs[1] and len(outs[0]) == 7
    assert [int(k) for k in outs[0]] == sorted(int(k) for k in outs[0])


def test_max_failures_stops_early_and_counts_what_was_skipped(env, tmp_path):
    r = sheepdog("map", "--range", "1:40", "-j", "1", "--max-failures", "10%", "--out",
                 "out", "--", "sh", "-c", "test {} -lt 3", env=env, cwd=str(tmp_path))
    assert r.returncode != 0
    assert "stopped early: 5 items failed, more than --max-failures 10%" in r.stderr
    counts: dict[str, int] = {}
    for record in _items(tmp_path / "out"):
        counts[record["status"]] = counts.get(record["status"], 0) + 1
    assert counts["success"] == 2 and counts["failed"] == 5
    assert counts.get("skipped", 0) + counts.get("queued", 0) == 33
    assert sum(counts.values()) == 40  # every item accounted for, exactly once


def test_retry_failed_runs_only_the_failed_items(env, tmp_path):
    ran = tmp_path / "ran.txt"
    # items 2 and 4 fail until their marker exists
    command = ["sh", "-c", f"echo {{}} >> {ran}; [ $(({{}} % 2)) = 1 ] || "
                           f"[ -e {tmp_path}/fixed ]"]
    first = sheepdog("map", "--range", "1:5", "--detach", "--", *command, env=env,
                     cwd=str(tmp_path))
    job_id = first.stdout.strip()
    sheepdog("logs", job_id, "--follow", env=env)  # until it ended (a worker was started)
    (tmp_path / "fixed").write_text("")
    r = sheepdog("map", "--retry-failed", job_id, "--out", "out", env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert sorted(ran.read_text().split()) == ["1", "2", "2", "3", "4", "4", "5"]
    records = _items(tmp_path / "out")
    assert [x["status"] for x in records] == ["success"] * 5
    assert [x["key"] for x in records] == ["1", "2", "3", "4", "5"]


def test_check_fields_must_agree_across_items(env, tmp_path):
    (tmp_path / "parts.txt").write_text("a\nb\nc\n")
    r = sheepdog("map", "--items", "parts.txt", "--check", "species", "--", "sh", "-c",
                 'if [ {} = c ]; then s=mouse; else s=human; fi; '
                 'printf \'{"species": "%s", "part": "{}"}\' $s', env=env, cwd=str(tmp_path))
    assert r.returncode == 1
    assert "items disagree on 'species'" in r.stderr
    assert '"human" in items a, b' in r.stderr and '"mouse" in item c' in r.stderr
    ok = sheepdog("map", "--items", "parts.txt", "--check", "species", "--", "sh", "-c",
                  'printf \'{"species": "human"}\'', env=env, cwd=str(tmp_path))
    assert ok.returncode == 0, ok.stderr


def test_a_slow_item_times_out_alone(env, tmp_path):
    r = sheepdog("map", "--range", "1:3", "--timeout", "1", "--out", "out", "--",
                 "sh", "-c", "[ {} != 2 ] || sleep 30", env=env, cwd=str(tmp_path), timeout=60)
    assert r.returncode == 1
    assert [x["status"] for x in _items(tmp_path / "out")] == ["success", "timeout", "success"]


def test_files_are_staged_by_content_and_item_files_come_back(env, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name, text in (("x.txt", "xx"), ("y.txt", "yyyy")):
        (data / name).write_text(text)
    r = sheepdog("map", "--files", "data/*.txt", "--out", "out", "--", "sh", "-c",
                 'wc -c < {} > "$SHEEPDOG_ITEM_DIR/size"; echo {/.}', env=env,
                 cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    records = _items(tmp_path / "out")
    assert [x["output"] for x in records] == ["x\n", "y\n"]
    assert records[1]["files"] == ["files/2/size"]
    assert (tmp_path / "out" / "files" / "2" / "size").read_text().strip() == "4"


def test_one_item_by_key_and_explicit_answers_when_there_is_none(env, tmp_path):
    (tmp_path / "ids.txt").write_text("good\nbad\n")
    r = sheepdog("map", "--items", "ids.txt", "--detach", "--", "sh", "-c",
                 "sleep 3; echo result-{}; [ {} = good ]", env=env, cwd=str(tmp_path))
    job_id = r.stdout.strip()
    pending = sheepdog("result", job_id, "--item", "good", env=env)  # still sleeping
    sheepdog("logs", job_id, "--follow", env=env)
    good = sheepdog("result", job_id, "--item", "good", env=env)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["output"] == "result-good\n"
    bad = sheepdog("result", job_id, "--item", "bad", env=env)
    assert bad.returncode != 0 and "item 'bad' failed: exit code 1" in bad.stderr
    missing = sheepdog("result", job_id, "--item", "nope", env=env)
    assert missing.returncode != 0 and "no such item 'nope'" in missing.stderr
    assert pending.returncode != 0 and "not finished" in pending.stderr


def test_map_over_rest_serves_items_by_key_with_explicit_errors(redis_server, home, conn,
                                                               queue, workers, env):
    from web_helpers import conforms

    from web import create_app

    auth = {"Authorization": "Bearer t"}
    client = create_app({"TESTING": True, "SETTINGS": {
        "redis_url": redis_server.url, "home": home, "api_tokens": ("t",),
        "queue": queue}}).test_client()
    body = {"workflow": "map", "command": ["sh", "-c", 'echo "{name}={dose}"; [ {dose} != 0 ]'],
            "items": [{"name": f"m{i}", "dose": i % 4} for i in range(250)], "key": "name",
            "chunk": 10}
    r = client.post("/jobs", headers=auth, json=body)
    assert r.status_code == 202, r.get_json()
    job_id = r.get_json()["id"]
    early = client.get(f"/jobs/{job_id}/items/m1", headers=auth)
    assert early.status_code == 409 and "not finished" in early.get_json()["error"]
    workers.start("--burst", "-j", "2")
    wait_for(lambda: client.get(f"/jobs/{job_id}", headers=auth).get_json()["status"]
             in ("success", "error"), timeout=120, what="the map job")
    one = client.get(f"/jobs/{job_id}/items/m5", headers=auth)
    assert one.status_code == 200 and one.get_json()["output"] == "m5=1\n"
    conforms(one.get_json(), "Item")
    failed = client.get(f"/jobs/{job_id}/items/m4", headers=auth)
    assert failed.status_code == 409 and "failed: exit code 1" in failed.get_json()["error"]
    assert client.get(f"/jobs/{job_id}/items/zz", headers=auth).status_code == 404
    # the job's read token opens its items too (a shared page lists the failed ones)
    read = {"Authorization": f"Bearer {r.get_json()['read_token']}"}
    assert client.get(f"/jobs/{job_id}/items/m5", headers=read).status_code == 200
    assert client.get(f"/jobs/{job_id}/items?state=failed", headers=read).status_code == 200
    assert client.get("/jobs", headers=read).status_code == 401
    # pages of failed items, in input order, until next_after is null
    keys, after = [], None
    while True:
        query = "state=failed" + (f"&after={after}" if after else "")
        page = client.get(f"/jobs/{job_id}/items?{query}", headers=auth).get_json()
        conforms(page, "ItemPage")
        keys += [item["key"] for item in page["items"]]
        after = page["next_after"]
        if after is None:
            break
    assert keys == [f"m{i}" for i in range(250) if i % 4 == 0]
    assert client.get(f"/jobs/{job_id}/items?state=bogus", headers=auth).status_code == 400
    bad = client.post("/jobs", headers=auth, json={**body, "command": ["echo", "{nme}"]})
    assert bad.status_code == 400 and bad.get_json()["field"] == "command"
    dup = client.post("/jobs", headers=auth, json={**body, "items": ["a", "b", "a"],
                                                   "key": None, "command": ["echo"]})
    assert dup.status_code == 400 and "duplicate key 'a'" in dup.get_json()["error"]
    # "append": false is the CLI's -N0: the command runs as it is
    as_is = client.post("/jobs", headers=auth, json={
        "workflow": "map", "command": ["sh", "-c", 'echo "$SHEEPDOG_ITEM_KEY $#"'],
        "items": ["x", "y"], "append": False})
    assert as_is.status_code == 202, as_is.get_json()
    as_is_id = as_is.get_json()["id"]
    workers.start("--burst")  # the first ones may have found their queue empty and left
    wait_for(lambda: client.get(f"/jobs/{as_is_id}", headers=auth).get_json()["status"]
             in ("success", "error"), timeout=60, what="the -N0 map job")
    assert client.get(f"/jobs/{as_is_id}/items/y", headers=auth).get_json()["output"] == "y 0\n"
    flag = client.post("/jobs", headers=auth, json={**body, "append": "no"})
    assert flag.status_code == 400 and flag.get_json()["field"] == "append"


def test_large_chunks_run_their_items_in_one_process_with_the_same_records(env, tmp_path):
    """From 16 items a chunk runs as a process of its own and spawns its items cheaply:
    the records are the same, and a timeout still kills an item's whole tree."""
    tick = tmp_path / "tick"
    r = sheepdog("map", "--range", "1:40", "--chunk", "20", "--timeout", "1", "--out", "out",
                 "--", "sh", "-c", f'[ {{}} != 25 ] || {{ (while :; do date +%s%N >> {tick}; '
                 f'sleep 0.1; done) & sleep 30; }}; echo {{}}; [ {{}} != 7 ] || exit 4',
                 env=env, cwd=str(tmp_path), timeout=60)
    assert r.returncode == 1
    records = _items(tmp_path / "out")
    assert [x["status"] for x in records].count("success") == 38
    assert records[24]["status"] == "timeout" and "timed out after 1s" in records[24]["stderr"]
    assert records[6]["exit_code"] == 4 and records[6]["output"] == "7\n"
    import time
    before = tick.read_text().count("\n")
    time.sleep(0.5)
    assert tick.read_text().count("\n") == before  # the grandchild died with its item
    missing = sheepdog("map", "--range", "1:20", "--chunk", "20", "--out", "o2", "--",
                       "no-such-program", env=env, cwd=str(tmp_path))
    assert missing.returncode == 1
    first = _items(tmp_path / "o2")[0]
    assert first["exit_code"] == 127 and "cannot start 'no-such-program'" in first["stderr"]


def test_map_items_may_be_an_uploaded_csv(redis_server, home, conn, queue, workers):
    import io

    from web import create_app

    auth = {"Authorization": "Bearer t"}
    client = create_app({"TESTING": True, "SETTINGS": {
        "redis_url": redis_server.url, "home": home, "api_tokens": ("t",),
        "queue": queue}}).test_client()
    csv_text = b"sample,reads\ns1,10\ns2,20\ns3,30\n"
    body = {"workflow": "map", "command": ["sh", "-c", "echo $(({reads} * 2))"],
            "inputs": {"items": "samples.csv"}, "key": "sample"}
    r = client.post("/jobs", headers=auth, content_type="multipart/form-data", data={
        "job": json.dumps(body), "items": (io.BytesIO(csv_text), "samples.csv")})
    assert r.status_code == 202, r.get_json()
    job_id = r.get_json()["id"]
    workers.start("--burst")
    wait_for(lambda: client.get(f"/jobs/{job_id}", headers=auth).get_json()["status"]
             == "success", timeout=60, what="the map job")
    assert client.get(f"/jobs/{job_id}/items/s2", headers=auth).get_json()["output"] == "40\n"
    bad = client.post("/jobs", headers=auth, content_type="multipart/form-data", data={
        "job": json.dumps({**body, "key": "nope"}),
        "items": (io.BytesIO(csv_text), "samples.csv")})
    assert bad.status_code == 400 and bad.get_json()["field"] == "inputs.items"
    assert "--key 'nope' is not a column" in bad.get_json()["error"]


def test_a_straggler_is_started_once_more_and_the_first_to_finish_wins(env, tmp_path):
    """Item 3 hangs on its first run only (as a stuck host would); once the others are
    done it is started once more, and the second run's answer is taken."""
    marker, tick = tmp_path / "first-run", tmp_path / "tick"
    script = (f'if [ {{}} = 3 ] && [ ! -e {marker} ]; then touch {marker}; '
              f'while :; do date +%s%N >> {tick}; sleep 0.2; done; fi; echo "item {{}}"')
    started = time.monotonic()
    r = sheepdog("map", "--range", "1:4", "-j", "3", "--straggler-after", "1", "--out", "out",
                 "--", "sh", "-c", script, env=env, cwd=str(tmp_path), timeout=120)
    took = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    assert took < 30, took  # not waiting for the stuck first run
    assert "item 3: still running after 1s while the others are done" in r.stderr
    records = _items(tmp_path / "out")
    assert [x["output"] for x in records] == [f"item {n}\n" for n in range(1, 5)]
    assert [x["status"] for x in records] == ["success"] * 4
    before = tick.read_text().count("\n")
    time.sleep(1.0)
    assert tick.read_text().count("\n") == before  # the stuck first run was stopped


def test_a_pieces_items_are_counted_once_however_often_it_is_reported(conn):
    from sheepdog import store

    first = store.count(conn, "j1", "t1", total=("items_total", 10), items_done=4,
                        items_failed=1)
    again = store.count(conn, "j1", "t1", total=("items_total", 99), items_done=4,
                        items_failed=1)  # a worker retrying through an outage
    other = store.count(conn, "j1", "t2", items_done=6)
    assert first == again == {"items_total": 10, "items_done": 4, "items_failed": 1}
    assert other == {"items_total": 10, "items_done": 10, "items_failed": 1}
    assert store.counts(conn, "j1") == other


def test_run_many_starts_items_in_the_scratch_directory_even_after_an_item_remade_it(
        tmp_path, monkeypatch):
    """Without --cwd (shell and Slurm backends) items start in their scratch directory;
    run-many changes into it only when it changed, so an item that removes and makes it
    again must not leave the next one in a deleted directory."""
    monkeypatch.chdir(tmp_path)  # run-many changes this process's directory
    from sheepdog.mapping import step

    script = ('if [ "$SHEEPDOG_ITEM_KEY" = 3 ]; then rm -rf "$SHEEPDOG_ITEM_DIR"; '
              'mkdir "$SHEEPDOG_ITEM_DIR"; else echo "$SHEEPDOG_ITEM_KEY" > ./mine; fi')
    spec = {"items": [{"key": str(n), "argv": [["sh"], ["-c"], [script]]}
                      for n in range(1, 21)]}
    said: list[str] = []
    assert step.main(["run-many", json.dumps(spec)], workdir=tmp_path, emit=said.append,
                     complain=said.append) == 0
    records = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["success"] * 20, said
    assert [r["files"] for r in records] == [["mine"]] * 2 + [[]] + [["mine"]] * 17
    for n in (0, 1, *range(3, 20)):
        assert (tmp_path / "files" / str(n) / "mine").read_text() == f"{n + 1}\n"


def test_a_piece_is_taken_in_one_call_and_its_success_with_its_counts_in_one_more(
        env, conn, tmp_path):
    """Issue 30: a `--chunk 1` piece's items were counted by a third call after its
    success; now the worker's Redis calls per piece are its take and its finish."""
    import hashlib
    import threading

    from sheepdog import store

    def sha(text: str) -> str:
        return hashlib.sha1(text.encode()).hexdigest()

    scripts = {sha(store._SUCCEED): "finish", sha(store._COUNT): "count",
               sha(store._TAKE): "take"}
    for text in (store._SUCCEED, store._COUNT, store._TAKE):
        conn.script_load(text)  # known: each is called by its SHA alone, once
    seen: dict[str, int] = {}
    ready, done = threading.Event(), threading.Event()

    def watch() -> None:
        with conn.monitor() as m:
            ready.set()
            for command in m.listen():
                words = command["command"].split()
                if command.get("client_type") != "lua" and words[0] == "EVALSHA":
                    name = scripts.get(words[1], "other")
                    seen[name] = seen.get(name, 0) + 1
                if done.is_set() and words[0] == "PING":
                    return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert ready.wait(10)
    n = 30
    r = sheepdog("map", "--range", f"1:{n}", "--chunk", "1", "-N0", "--json", "--", "true",
                 env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    done.set()
    conn.ping()  # the watcher's last command
    watcher.join(10)
    job = json.loads(r.stdout)["id"]
    assert store.counts(conn, job) == {"items_total": n, "items_done": n, "items_failed": 0}
    assert seen.get("count", 0) == 0, seen  # counted with each piece's success
    # each piece and the gather one call; the piece that makes the gather ready asks again
    # with its queue commands (dispatch.push_commands), so one more
    assert seen.get("finish") == n + 2, seen
    assert n + 1 <= seen.get("take", 0) <= n + 1 + 8, seen  # and a last look per slot


def test_a_runs_arguments_read_directly_are_what_argparse_reads():
    """A `run` step's arguments, as map writes them, are read without argparse (it cost
    more than a `true` item); the result is argparse's, and anything else still goes
    through argparse, errors included."""
    import argparse

    from sheepdog.mapping import step

    for argv in (["run", "{}"], ["run", "s.json", "--cwd", "/x", "--cwd", "/z"],
                 ["run", "{}", "--input", "a", "/p", "--cwd", "/y", "--input", "b", "/q"],
                 ["run-many", "{}", "--cwd", "/x"],
                 ["gather", "index.json", "c1", "--check", "n"]):
        assert vars(step._args(argv)) == vars(step._parser().parse_args(argv)), argv
    for bad in (["run", "{}", "--cwd"], ["run", "{}", "--input", "a"], ["run", "{}", "x"],
                ["run", "{}", "--bogus", "1"], ["run", "{}", "--cwd", "-x"]):
        with pytest.raises((SystemExit, argparse.ArgumentError)):
            step._args(bad)


def test_a_one_item_run_in_a_directory_holding_its_spec_keeps_the_spec_out_of_its_files(
        tmp_path):
    """A process step's directory may hold its staged spec: its one item then runs in a
    scratch directory of its own, as a chunk's items do, and the spec is no item's file."""
    from sheepdog.mapping import step

    spec = tmp_path / "spec.json"
    script = 'echo $(ls -A "$SHEEPDOG_ITEM_DIR" | wc -l); echo 1 > "$SHEEPDOG_ITEM_DIR/o"'
    spec.write_text(json.dumps({"items": [{"key": "a", "argv": [["sh"], ["-c"], [script]]}]}))
    said: list[str] = []
    assert step.main(["run", str(spec)], workdir=tmp_path, emit=said.append,
                     complain=said.append) == 0
    [record] = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert (record["output"], record["files"]) == ("0\n", ["o"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["files", "results.jsonl", "spec.json"]
    assert (tmp_path / "files" / "0" / "o").read_text() == "1\n"
