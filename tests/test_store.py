import threading

import numpy as np
import pytest

from crs_core import store
from crs_core.errors import WorkspaceError
from crs_core.store import SCHEMA_VERSION, Workspace, blobs_to_vectors, vectors_to_blobs, workspace_path


def test_new_workspace_is_migrated_to_current_version(tmp_path):
    with Workspace(tmp_path / "w.duckdb") as ws:
        assert ws.schema_version() == SCHEMA_VERSION
        assert set(ws.status()) >= {"items", "reviews", "selections", "synthetic_queries", "runs"}
        assert all(n == 0 for n in ws.status().values())


def test_reopening_keeps_data_and_version(tmp_path):
    path = tmp_path / "w.duckdb"
    with Workspace(path) as ws:
        with ws.transaction() as cur:
            cur.execute("INSERT INTO items (item_id, title) VALUES ('tt1', 'Alien')")
    with Workspace(path) as ws:
        assert ws.count("items") == 1
        assert ws.schema_version() == SCHEMA_VERSION


def test_forward_migration_from_older_version(tmp_path, monkeypatch):
    """A workspace made at schema version 1 is migrated through every later step, data kept."""
    path = tmp_path / "w.duckdb"
    current = list(store.MIGRATIONS)
    monkeypatch.setattr(store, "MIGRATIONS", current[:1])
    monkeypatch.setattr(store, "SCHEMA_VERSION", 1)
    with Workspace(path) as ws:
        assert ws.schema_version() == 1
        with ws.transaction() as cur:
            cur.execute("INSERT INTO items (item_id, title) VALUES ('tt1', 'Alien')")
    extra = "CREATE TABLE annotations_v2 (id INTEGER); ALTER TABLE items ADD COLUMN popularity DOUBLE;"
    monkeypatch.setattr(store, "MIGRATIONS", current + [extra])
    monkeypatch.setattr(store, "SCHEMA_VERSION", len(current) + 1)
    with Workspace(path) as ws:
        assert ws.schema_version() == len(current) + 1
        assert "popularity" in ws.df("SELECT * FROM items").columns
        assert ws.count("items") == 1
        assert ws.count("budget_curve_points") == 0  # a table of migration 2 exists


def test_workspace_from_a_newer_studio_is_refused(tmp_path):
    path = tmp_path / "w.duckdb"
    with Workspace(path) as ws:
        ws.set_meta("schema_version", str(SCHEMA_VERSION + 5))
    with pytest.raises(WorkspaceError, match="newer than this studio"):
        Workspace(path)


def test_failed_transaction_leaves_workspace_unchanged(tmp_path):
    with Workspace(tmp_path / "w.duckdb") as ws:
        with ws.transaction() as cur:
            cur.execute("INSERT INTO items (item_id, title) VALUES ('tt1', 'Alien')")
        with pytest.raises(RuntimeError):
            with ws.transaction() as cur:
                cur.execute("INSERT INTO items (item_id, title) VALUES ('tt2', 'Aliens')")
                raise RuntimeError("crash half-way")
        assert ws.df("SELECT item_id FROM items")["item_id"].tolist() == ["tt1"]


def test_many_threads_write_through_their_own_cursors(tmp_path):
    with Workspace(tmp_path / "w.duckdb") as ws:
        errors = []

        def write(i: int) -> None:
            try:
                for j in range(20):
                    with ws.transaction() as cur:
                        cur.execute("INSERT INTO tags VALUES (?, ?, 'tag', 0, 'test')", [f"u{i}", f"i{j}"])
                    ws.count("tags")
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert ws.count("tags") == 120


def test_read_only_open_of_missing_workspace_says_what_to_do(tmp_path):
    with pytest.raises(WorkspaceError, match="crs_core init"):
        Workspace(tmp_path / "nope.duckdb", read_only=True)


def test_workspace_path_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("CRS_WORKSPACE", str(tmp_path / "env.duckdb"))
    assert workspace_path() == tmp_path / "env.duckdb"
    assert workspace_path(tmp_path / "flag.duckdb") == tmp_path / "flag.duckdb"
    monkeypatch.delenv("CRS_WORKSPACE")
    assert workspace_path() == store.DEFAULT_WORKSPACE


def test_vector_blobs_round_trip():
    matrix = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    assert np.array_equal(blobs_to_vectors(vectors_to_blobs(matrix), 7), matrix)
    assert blobs_to_vectors([], 3).shape == (0, 3)


@pytest.mark.parametrize("needle, hay, hit", [
    ("a_b", "xa_by", True), ("a_b", "axb", False),        # _ is literal, not "any character"
    ("50%", "only 50% off", True), ("50%", "500 off", False),
    ("c:\\dir", "in c:\\dir now", True), ("  The Matrix ", "the matrix (1999)", True),
])
def test_contains_pattern_matches_the_text_literally(needle, hay, hit):
    import duckdb

    from crs_core.store import contains_pattern

    got = duckdb.execute("SELECT ? ILIKE ? ESCAPE '\\'", [hay, contains_pattern(needle)]).fetchone()[0]
    assert got is hit


def test_contains_clause_pairs_each_column_with_the_escaped_pattern():
    import duckdb

    from crs_core.store import contains_clause

    clause, params = contains_clause("a_b", "x", "y")
    assert clause == "(x ILIKE ? ESCAPE '\\' OR y ILIKE ? ESCAPE '\\')" and len(params) == 2
    hits = duckdb.execute(f"SELECT x FROM (VALUES ('a_b', 'no'), ('axb', 'no'), ('no', 'A_B!')) t(x, y) "
                          f"WHERE {clause} ORDER BY x", params).fetchall()
    assert hits == [("a_b",), ("no",)]


# -- a wrong workspace path (issue 13, finding 2) -------------------------------------------------
@pytest.mark.parametrize("name,content,what", [
    ("reviews.csv", b"review_id,item_id,text\nr1,tt1,Great\n", "CSV"),
    ("reviews.jsonl", b'{"review_id": "r1", "text": "Great"}\n', "JSON"),
    ("old.sqlite", None, "SQLite"),
    ("empty.duckdb", b"", "empty"),
])
def test_an_existing_file_that_is_not_a_duckdb_database_is_refused_untouched(tmp_path, name, content, what):
    """DuckDB opened a CSV / JSONL path as an in-memory database (every write lost, exit 0) and
    tried to download its SQLite extension for a SQLite file: the workspace refuses them all."""
    path = tmp_path / name
    if content is None:
        import sqlite3

        con = sqlite3.connect(path)
        con.execute("CREATE TABLE t (a)")
        con.commit()
        con.close()
    else:
        path.write_bytes(content)
    before = path.read_bytes()
    with pytest.raises(WorkspaceError, match="not a DuckDB workspace") as info:
        Workspace(path)
    assert str(path) in str(info.value) and what in str(info.value)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_folder_as_workspace_is_refused(tmp_path):
    with pytest.raises(WorkspaceError, match="is a folder"):
        Workspace(tmp_path)


def test_a_database_not_backed_by_the_file_is_refused(tmp_path, monkeypatch):
    """The second guard: whatever DuckDB opens must be backed by the workspace file."""
    path = tmp_path / "ratings.csv"
    path.write_text("a,b\n1,2\n")
    monkeypatch.setattr(store, "_refuse_non_duckdb", lambda p: None)  # only the second guard left
    with pytest.raises(WorkspaceError, match="in memory") as info:
        Workspace(path)
    assert str(path) in str(info.value)


def test_extensions_are_never_installed_or_loaded_automatically(tmp_path):
    with Workspace(tmp_path / "w.duckdb") as ws:
        assert ws.scalar("SELECT current_setting('autoinstall_known_extensions')") is False
        assert ws.scalar("SELECT current_setting('autoload_known_extensions')") is False


def test_an_unusable_parent_folder_is_one_clear_error(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(WorkspaceError, match="cannot create the folder") as info:
        Workspace(blocker / "sub" / "w.duckdb")
    assert str(blocker / "sub" / "w.duckdb") in str(info.value)


def test_opening_leaves_no_transaction_open(tmp_path):
    """The file-backed check must not hold a transaction (CHECKPOINT would refuse to run)."""
    with Workspace(tmp_path / "w.duckdb") as ws:
        ws.cursor().execute("CHECKPOINT")


def test_many_small_commits_do_not_checkpoint_at_every_16_mb_of_wal(tmp_path):
    """Each checkpoint rewrites a table's index whole: a big WAL threshold keeps a million-vector
    embedding run (a commit per 512 vectors) from checkpointing ~100 times (issue #16)."""
    path = tmp_path / "w.duckdb"
    with Workspace(path) as ws:
        assert ws.scalar("SELECT current_setting('checkpoint_threshold')") == "244.1 MiB"  # 256 MB
        blob = b"\0" * 1536  # a 384-d float32 vector
        for chunk in range(12):  # ~18 MB of vectors, past DuckDB's default 16 MB threshold
            with ws.transaction() as cur:
                cur.executemany("INSERT INTO embedding_cache VALUES ('m', ?, ?)",
                                [(f"{chunk}-{i}", blob) for i in range(1000)])
        wal = path.with_name(path.name + ".wal")
        assert wal.exists() and wal.stat().st_size > 16 * 2**20  # no checkpoint yet
    assert not wal.exists() or wal.stat().st_size == 0  # a clean close checkpoints
    with Workspace(path) as ws:
        assert ws.count("embedding_cache") == 12_000
