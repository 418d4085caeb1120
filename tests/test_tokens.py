"""Tokens with roles, as stored and as checked (no service needed)."""

from __future__ import annotations

import json

import pytest

from sheepdog import tokens
from sheepdog.config import Settings
from sheepdog.connection import shown
from sheepdog.errors import ConfigError


def test_roles_grant_what_the_issue_says():
    may = {role: {need for need in tokens.ROLES if tokens.Identity("x", role).may(need)}
           for role in tokens.ROLES}
    assert may == {"read": {"read"}, "submit": {"read", "submit"}, "worker": {"worker"},
                   "admin": set(tokens.ROLES)}


def test_add_list_revoke_and_the_file_keeps_only_hashes(tmp_path):
    path = tmp_path / "tokens.json"
    entry, token = tokens.add(path, "worker", "lab")
    assert token.startswith(tokens.PREFIX) and len(token) > 40
    assert token not in path.read_text() and entry.sha256 in path.read_text()
    assert [(e.name, e.role) for e in tokens.load(path)] == [("lab", "worker")]
    with pytest.raises(ConfigError, match="exists already"):
        tokens.add(path, "read", "lab")
    with pytest.raises(ConfigError, match="unknown role"):
        tokens.add(path, "root", "other")
    assert tokens.revoke(path, "lab") and not tokens.revoke(path, "lab")
    assert tokens.load(path) == []


def test_the_registry_reads_the_file_again_when_it_changes(tmp_path):
    path = tmp_path / "tokens.json"
    registry = tokens.Registry(Settings(tokens_file=str(path), api_tokens=("old",),
                                        home=tmp_path))
    assert registry.identify("old") == tokens.Identity("api", "admin", trusted=True)  # every role
    assert registry.identify("nope") is None and registry.identify("") is None
    _, token = tokens.add(path, "submit", "gn2")
    assert registry.identify(token) == tokens.Identity("gn2", "submit")
    tokens.revoke(path, "gn2")
    assert registry.identify(token) is None


def test_a_broken_tokens_file_opens_nothing_and_names_itself(tmp_path):
    path = tmp_path / "tokens.json"
    _, token = tokens.add(path, "admin", "a")
    registry = tokens.Registry(Settings(tokens_file=str(path), home=tmp_path))
    assert registry.identify(token) is not None
    path.write_text("{ half a file")
    assert registry.identify(token) is None  # fails closed
    with pytest.raises(ConfigError, match=str(path)):
        tokens.load(path)
    path.write_text(json.dumps({"tokens": [{"name": "x", "role": "boss", "sha256": "0"}]}))
    with pytest.raises(ConfigError, match="unknown role 'boss'"):
        tokens.load(path)


def test_printed_redis_urls_hide_the_password():
    assert shown("rediss://worker:s3cret@host:6380/0") == "rediss://worker:***@host:6380/0"
    assert shown("redis://:s3cret@host/0") == "redis://:***@host/0"
    assert shown("redis://host:6379/0") == "redis://host:6379/0"
