"""The workspace: one DuckDB file holding everything the studio curates.

Concurrency model (see DESIGN.md): one process owns the file (the studio or a CLI command).
Inside that process every thread gets its own cursor on one shared connection, so many
Streamlit sessions can read and write safely. Background jobs never open the workspace;
they work from files exported to their job folder.

Schema changes are forward migrations: a list of SQL scripts, applied in order, each in
its own transaction, with the reached version recorded in `meta`.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Iterator

import duckdb
import numpy as np
import pandas as pd

from .errors import WorkspaceError

ENV_WORKSPACE = "CRS_WORKSPACE"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORKSPACE = PROJECT_ROOT / "data" / "workspaces" / "default.duckdb"


def workspace_path(explicit: str | os.PathLike | None = None) -> Path:
    """The workspace file to use: an explicit path, else $CRS_WORKSPACE, else the default."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get(ENV_WORKSPACE)
    if env:
        return Path(env).expanduser().resolve()
    return DEFAULT_WORKSPACE


# Each entry migrates from version i to i+1. Append only; never edit a released entry.
MIGRATIONS: list[str] = [
    # 1: the foundation tables, plus the tables later steps fill.
    """
    CREATE TABLE items (
        item_id      VARCHAR PRIMARY KEY,  -- 'tt0133093' when an IMDb id is known, else '<source>:<id>'
        title        VARCHAR NOT NULL,     -- display title without year
        year         INTEGER,
        genres       VARCHAR,              -- '|'-separated, lower case
        plot         VARCHAR,
        directors    VARCHAR,              -- '|'-separated
        cast_names   VARCHAR,              -- '|'-separated
        imdb_id      VARCHAR,
        redial_id    VARCHAR,
        inspired_id  VARCHAR,
        movielens_id INTEGER,
        sources      VARCHAR               -- '|'-separated catalogs the item came from
    );
    CREATE TABLE reviews (
        review_id VARCHAR PRIMARY KEY,
        item_id   VARCHAR NOT NULL,
        user_id   VARCHAR,
        text      VARCHAR NOT NULL,
        rating    DOUBLE,
        ts        BIGINT,
        source    VARCHAR NOT NULL
    );
    CREATE TABLE interactions (
        user_id VARCHAR NOT NULL,
        item_id VARCHAR NOT NULL,
        rating  DOUBLE,
        ts      BIGINT,
        source  VARCHAR NOT NULL
    );
    CREATE TABLE tags (
        user_id VARCHAR, item_id VARCHAR NOT NULL, tag VARCHAR NOT NULL, ts BIGINT, source VARCHAR
    );
    -- evaluation / training dialogues resolved to catalog items
    CREATE TABLE dialogue_turns (
        dataset    VARCHAR NOT NULL,       -- 'redial_test', 'inspired_test', 'inspired_train', ...
        turn_id    VARCHAR NOT NULL,
        dialog_id  VARCHAR NOT NULL,
        context    JSON NOT NULL,          -- list of utterances before the turn
        resp       VARCHAR,
        rec_items  JSON NOT NULL,          -- catalog item ids recommended at this turn
        rec_titles JSON NOT NULL,          -- titles as written in the source
        mentioned_items JSON NOT NULL,     -- catalog item ids mentioned earlier in the dialogue
        PRIMARY KEY (dataset, turn_id)
    );
    -- embeddings cached per (model, text); a set lists which texts form it
    CREATE TABLE embedding_cache (
        model     VARCHAR NOT NULL,
        text_hash VARCHAR NOT NULL,
        vector    BLOB NOT NULL,           -- float32 little-endian
        PRIMARY KEY (model, text_hash)
    );
    CREATE TABLE embedding_sets (
        set_id     VARCHAR PRIMARY KEY,    -- e.g. 'review:minilm'
        unit       VARCHAR NOT NULL,       -- 'review' | 'item'
        model      VARCHAR NOT NULL,
        dim        INTEGER NOT NULL,
        n          INTEGER NOT NULL,
        created_at TIMESTAMP DEFAULT current_timestamp
    );
    CREATE TABLE embedding_rows (
        set_id VARCHAR NOT NULL, pos INTEGER NOT NULL, unit_id VARCHAR NOT NULL,
        text_hash VARCHAR NOT NULL, PRIMARY KEY (set_id, pos)
    );
    CREATE TABLE clusterings (
        clustering_id VARCHAR PRIMARY KEY, -- '<set_id>:k<K>'
        set_id     VARCHAR NOT NULL,
        k          INTEGER NOT NULL,
        seed       INTEGER NOT NULL,
        inertia    DOUBLE,
        centers    BLOB NOT NULL,          -- float32 (k, dim)
        created_at TIMESTAMP DEFAULT current_timestamp
    );
    CREATE TABLE cluster_assignments (
        clustering_id VARCHAR NOT NULL, unit_id VARCHAR NOT NULL, cluster INTEGER NOT NULL,
        PRIMARY KEY (clustering_id, unit_id)
    );
    CREATE TABLE projections (
        set_id VARCHAR NOT NULL, unit_id VARCHAR NOT NULL, x REAL NOT NULL, y REAL NOT NULL,
        PRIMARY KEY (set_id, unit_id)
    );
    -- later steps: selection, synthesis, review, augmentation, LLM cache, jobs, metrics
    CREATE TABLE selections (
        selection_id VARCHAR PRIMARY KEY,
        name       VARCHAR,
        strategy   VARCHAR NOT NULL,
        unit       VARCHAR NOT NULL,
        set_id     VARCHAR NOT NULL,
        budget     INTEGER NOT NULL,
        params     JSON,
        summary    JSON,
        parent_id  VARCHAR,                -- the selection this one continues (rounds)
        created_at TIMESTAMP DEFAULT current_timestamp
    );
    CREATE TABLE selection_picks (
        selection_id VARCHAR NOT NULL, rank INTEGER NOT NULL, unit_id VARCHAR NOT NULL,
        score DOUBLE, round INTEGER NOT NULL DEFAULT 1, PRIMARY KEY (selection_id, rank)
    );
    CREATE TABLE synthetic_queries (
        query_id     VARCHAR PRIMARY KEY,
        selection_id VARCHAR,
        item_id      VARCHAR,
        query        VARCHAR NOT NULL,
        provenance   JSON,                 -- reviews, templates, prompts, teacher, tokens, cost
        gt_mode      VARCHAR,
        status       VARCHAR NOT NULL DEFAULT 'pending',  -- pending | approved | rejected
        version      INTEGER NOT NULL DEFAULT 1,
        created_at   TIMESTAMP DEFAULT current_timestamp
    );
    CREATE TABLE ground_truth (
        query_id VARCHAR NOT NULL, rank INTEGER NOT NULL, title_raw VARCHAR,
        item_id VARCHAR, match_score DOUBLE, flagged BOOLEAN NOT NULL DEFAULT FALSE,
        note VARCHAR, PRIMARY KEY (query_id, rank)
    );
    CREATE TABLE query_history (
        query_id VARCHAR NOT NULL, version INTEGER NOT NULL, action VARCHAR NOT NULL,
        snapshot JSON NOT NULL, annotator VARCHAR, note VARCHAR,
        created_at TIMESTAMP DEFAULT current_timestamp, PRIMARY KEY (query_id, version)
    );
    CREATE TABLE augmented_labels (
        dataset VARCHAR NOT NULL, turn_id VARCHAR NOT NULL, item_id VARCHAR NOT NULL,
        score DOUBLE NOT NULL, scorer VARCHAR NOT NULL, provenance JSON,
        PRIMARY KEY (dataset, turn_id, item_id, scorer)
    );
    CREATE TABLE llm_cache (
        cache_key  VARCHAR PRIMARY KEY,
        provider   VARCHAR, model VARCHAR,
        request    JSON NOT NULL, response JSON NOT NULL,
        prompt_tokens INTEGER, completion_tokens INTEGER, cost DOUBLE,
        created_at TIMESTAMP DEFAULT current_timestamp
    );
    CREATE TABLE jobs (
        job_id VARCHAR PRIMARY KEY, kind VARCHAR NOT NULL, status VARCHAR NOT NULL,
        folder VARCHAR NOT NULL, config JSON, imported BOOLEAN NOT NULL DEFAULT FALSE,
        created_at TIMESTAMP DEFAULT current_timestamp, finished_at TIMESTAMP
    );
    CREATE TABLE runs (
        run_id VARCHAR PRIMARY KEY, model VARCHAR NOT NULL, training_data VARCHAR,
        selection_strategy VARCHAR, budget INTEGER, seed INTEGER, config JSON,
        created_at TIMESTAMP DEFAULT current_timestamp
    );
    CREATE TABLE metrics (
        run_id VARCHAR NOT NULL, dataset VARCHAR NOT NULL, metric VARCHAR NOT NULL,
        value DOUBLE NOT NULL, stderr DOUBLE, n_turns INTEGER,
        PRIMARY KEY (run_id, dataset, metric)
    );
    """,
    # 2: budget-curve experiments (crs_core.budget_curve): metric vs selection budget per strategy.
    """
    CREATE TABLE budget_curve_experiments (
        experiment_id VARCHAR PRIMARY KEY,  -- hash of the parameters that define its points
        params     JSON NOT NULL,
        created_at TIMESTAMP DEFAULT current_timestamp
    );
    CREATE TABLE budget_curve_points (
        experiment_id VARCHAR NOT NULL,
        strategy   VARCHAR NOT NULL,
        budget     INTEGER NOT NULL,
        seed       INTEGER NOT NULL,
        dataset    VARCHAR NOT NULL,
        metric     VARCHAR NOT NULL,
        value      DOUBLE NOT NULL,
        stderr     DOUBLE,
        n_turns    INTEGER,
        n_train    INTEGER NOT NULL,       -- training examples (synthetic queries) behind the point
        teacher    VARCHAR,
        gt_mode    VARCHAR,
        selection_id VARCHAR,
        run_id     VARCHAR,                -- set when the point was also stored as a run
        created_at TIMESTAMP DEFAULT current_timestamp,
        PRIMARY KEY (experiment_id, strategy, budget, dataset, metric)
    );
    """,
    # 3: teacher requests sent and not yet answered (crs_core.teacher): a row is committed before
    # the request goes out and removed with its cache entry, so rows left by a crashed process
    # count the calls an endpoint may have billed without their reply reaching the cache.
    """
    CREATE TABLE llm_inflight (
        cache_key  VARCHAR PRIMARY KEY,
        owner      VARCHAR NOT NULL,       -- '<pid>:<random>' of the process that sent it
        started_at TIMESTAMP DEFAULT current_timestamp
    );
    """,
    # 4: review work shared by a team (crs_core.judging): assignments with an overlap, each
    # annotator's independent judgement, and the disputes a curator settles.
    """
    CREATE TABLE review_assignments (
        assignment_id VARCHAR PRIMARY KEY,
        name       VARCHAR NOT NULL,
        filters    JSON NOT NULL,          -- the review-queue filter the items were drawn with
        annotators JSON NOT NULL,          -- account names
        overlap    INTEGER NOT NULL,       -- independent judgements each dialogue needs
        rule       VARCHAR NOT NULL,       -- how the judgements decide: unanimous | majority
        created_by VARCHAR NOT NULL,
        created_at TIMESTAMP DEFAULT current_timestamp
    );
    CREATE TABLE assignment_items (
        assignment_id VARCHAR NOT NULL,
        query_id   VARCHAR NOT NULL,
        position   INTEGER NOT NULL,
        outcome    VARCHAR,                -- approved | rejected | disputed, once decided
        reason     VARCHAR,                -- why it is disputed
        decided_at TIMESTAMP,
        decided_version INTEGER,           -- the dialogue version the decision wrote
        settled_by VARCHAR,                -- the curator who settled a dispute
        PRIMARY KEY (assignment_id, query_id)
    );
    CREATE TABLE judgements (
        assignment_id VARCHAR NOT NULL,
        query_id   VARCHAR NOT NULL,
        annotator  VARCHAR NOT NULL,
        verdict    VARCHAR NOT NULL,       -- approved | rejected
        query      VARCHAR,                -- the query as this annotator left it
        ground_truth JSON,                 -- the list as this annotator left it
        note       VARCHAR,
        based_on_version INTEGER NOT NULL, -- the dialogue version the annotator saw
        created_at TIMESTAMP DEFAULT current_timestamp,
        PRIMARY KEY (assignment_id, query_id, annotator)
    );
    -- who made each selection, synthetic query, job and run (accounts.acting_name)
    ALTER TABLE selections ADD COLUMN created_by VARCHAR;
    ALTER TABLE synthetic_queries ADD COLUMN created_by VARCHAR;
    ALTER TABLE jobs ADD COLUMN created_by VARCHAR;
    ALTER TABLE runs ADD COLUMN created_by VARCHAR;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


class Workspace:
    """A DuckDB workspace file, safe to share between threads of one process."""

    def __init__(self, path: str | os.PathLike, *, read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        if read_only and not self.path.exists():
            raise WorkspaceError(f"workspace {self.path} does not exist; run `python -m crs_core init` first")
        _refuse_non_duckdb(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WorkspaceError(f"cannot create the folder of workspace {self.path}: {exc.strerror or exc}") from exc
        try:
            # no extension is ever downloaded or loaded behind our back (a SQLite file, for one,
            # would make DuckDB fetch its sqlite scanner from the network)
            self._con = duckdb.connect(str(self.path), read_only=read_only, config=_DUCKDB_CONFIG)
        except duckdb.IOException as exc:
            if "lock" in str(exc).lower():
                raise WorkspaceError(
                    f"workspace {self.path} is open in another process (the studio or another command); "
                    "close it there or use a different --workspace"
                ) from exc
            raise WorkspaceError(f"cannot open workspace {self.path}: {exc}") from exc
        except duckdb.Error as exc:
            raise WorkspaceError(f"cannot open workspace {self.path}: {exc}") from exc
        self._check_file_backed()
        self._local = threading.local()
        self._write_lock = threading.RLock()
        if not read_only:
            self.migrate()
        else:
            self._check_version()

    def _check_file_backed(self) -> None:
        """DuckDB opens some paths (a .csv or .jsonl name, say) as an in-memory database, which
        would silently lose every write: refuse anything not backed by our file."""
        with contextlib.closing(self._con.cursor()) as cur:  # (an open result would hold a transaction)
            rows = cur.execute(
                "SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchall()
        backing = rows[0][0] if rows else None
        if not backing or Path(backing).resolve() != self.path.resolve():
            self._con.close()
            raise WorkspaceError(
                f"workspace {self.path}: DuckDB did not open this file as a database "
                f"({'in memory' if not backing else backing}), so nothing would be saved; "
                "give a path ending in .duckdb")

    # -- connection handling -------------------------------------------------------------
    def cursor(self) -> duckdb.DuckDBPyConnection:
        """This thread's cursor (created on first use)."""
        cur = getattr(self._local, "cursor", None)
        if cur is None:
            cur = self._con.cursor()
            self._local.cursor = cur
        return cur

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> "Workspace":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """All-or-nothing writes: on any exception the workspace is left as it was."""
        if self.read_only:
            raise WorkspaceError(f"workspace {self.path} is open read-only")
        cur = self.cursor()
        with self._write_lock:
            cur.execute("BEGIN TRANSACTION")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            else:
                cur.execute("COMMIT")

    # -- schema ------------------------------------------------------------------------
    def schema_version(self) -> int:
        cur = self.cursor()
        exists = cur.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'meta'"
        ).fetchone()[0]
        if not exists:
            return 0
        row = cur.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row else 0

    def _check_version(self) -> None:
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise WorkspaceError(
                f"workspace {self.path} has schema version {version}, newer than this studio "
                f"understands ({SCHEMA_VERSION}); update the studio"
            )
        return None

    def migrate(self) -> int:
        """Apply pending migrations; returns the version reached."""
        self._check_version()
        cur = self.cursor()
        with self._write_lock:
            cur.execute("CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
            version = self.schema_version()
            for target in range(version + 1, SCHEMA_VERSION + 1):
                cur.execute("BEGIN TRANSACTION")
                try:
                    cur.execute(MIGRATIONS[target - 1])
                    cur.execute(
                        "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(target)]
                    )
                except BaseException:
                    cur.execute("ROLLBACK")
                    raise
                cur.execute("COMMIT")
        return SCHEMA_VERSION

    # -- small conveniences ----------------------------------------------------------------
    def df(self, sql: str, params: list | tuple | None = None) -> pd.DataFrame:
        return self.cursor().execute(sql, params or []).df()

    def scalar(self, sql: str, params: list | tuple | None = None) -> Any:
        row = self.cursor().execute(sql, params or []).fetchone()
        return None if row is None else row[0]

    def count(self, table: str) -> int:
        return int(self.scalar(f"SELECT count(*) FROM {_ident(table)}"))

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        value = self.scalar("SELECT value FROM meta WHERE key = ?", [key])
        return default if value is None else value

    def set_meta(self, key: str, value: Any, cur: duckdb.DuckDBPyConnection | None = None) -> None:
        text = value if isinstance(value, str) else json.dumps(value)
        (cur or self.cursor()).execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, text])

    def status(self) -> dict[str, int]:
        """Row counts of the main tables, for the home page and `status`."""
        tables = [
            "items", "reviews", "interactions", "tags", "dialogue_turns", "embedding_sets",
            "clusterings", "selections", "synthetic_queries", "augmented_labels", "jobs", "runs",
        ]
        return {t: self.count(t) for t in tables}


# checkpoint_threshold: DuckDB checkpoints (rewriting each table's index whole) whenever the WAL
# passes it; at the 16 MB default, embedding a million reviews (a commit per 512 vectors) made
# ~100 checkpoints of an ever larger cache, so the step grew quadratically (bench/scale_bench.py)
_DUCKDB_CONFIG = {"autoinstall_known_extensions": False, "autoload_known_extensions": False,
                  "checkpoint_threshold": "256MB"}
_DUCKDB_MAGIC = b"DUCK"  # bytes 8-11 of every DuckDB database file
_KNOWN_HEADERS = [(b"SQLite format 3\x00", "a SQLite database"), (b"\x1f\x8b", "a gzip file"),
                  (b"PAR1", "a Parquet file"), (b"PK\x03\x04", "a zip archive")]


def _refuse_non_duckdb(path: Path) -> None:
    """Raise WorkspaceError unless ``path`` is absent (a new workspace) or a DuckDB database."""
    if not path.exists():
        return
    if path.is_dir():
        raise WorkspaceError(f"workspace {path} is a folder; give the path of a .duckdb file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError as exc:
        raise WorkspaceError(f"cannot read workspace {path}: {exc.strerror or exc}") from exc
    if head[8:12] == _DUCKDB_MAGIC:
        return
    what = next((name for magic, name in _KNOWN_HEADERS if head.startswith(magic)), None)
    if what is None:
        text = head.lstrip()[:1]
        what = ("an empty file" if not head else "a JSON file" if text in (b"{", b"[")
                else "a text file (CSV?)" if all(b >= 9 for b in head) else "not a DuckDB database")
    raise WorkspaceError(
        f"{path} is not a DuckDB workspace ({what}); refusing to open it. Give the path of an existing "
        "workspace or of a new .duckdb file (input files are added with `python -m crs_core ingest FILE`)")


def _ident(name: str) -> str:
    if not name.replace("_", "").isalnum():
        raise ValueError(f"not a table name: {name!r}")
    return name


def contains_pattern(text: str) -> str:
    """A LIKE / ILIKE pattern matching values that contain ``text`` literally. Use it with
    ``ESCAPE '\\'`` (DuckDB has no default escape character: without the clause, a search for
    "a_b" would look for a backslash)."""
    return "%" + text.strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def contains_clause(text: str, *columns: str) -> tuple[str, list[str]]:
    """``(a ILIKE ? ESCAPE '\\' OR b ...)`` and its parameters: any of ``columns`` contains
    ``text`` literally. Pattern and ESCAPE clause come together, so no caller can forget one."""
    sql = " OR ".join(f"{column} ILIKE ? ESCAPE '\\'" for column in columns)
    return f"({sql})", [contains_pattern(text)] * len(columns)


def insert_frame(cur, table: str, frame: pd.DataFrame) -> None:
    """INSERT the rows of ``frame`` into ``table`` (columns by name) on ``cur``, inside the
    caller's transaction."""
    if frame.empty:
        return
    cur.register("_insert_frame", frame)
    try:
        cols = ", ".join(frame.columns)
        cur.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _insert_frame")
    finally:
        cur.unregister("_insert_frame")


def vectors_to_blobs(matrix: np.ndarray) -> list[bytes]:
    matrix = np.ascontiguousarray(matrix, dtype="<f4")
    return [row.tobytes() for row in matrix]


def blobs_to_vectors(blobs: list[bytes], dim: int) -> np.ndarray:
    if not blobs:
        return np.zeros((0, dim), dtype=np.float32)
    return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), dim).copy()


def open_workspace(path: str | os.PathLike | None = None, *, read_only: bool = False) -> Workspace:
    return Workspace(workspace_path(path), read_only=read_only)
