"""Read-only query helpers behind the studio's pages (tables, counts, joins).

Pages stay thin: each function takes a workspace and plain parameters and returns a DataFrame
or plain data, so results can be cached by the app (keyed by `data_version`). Nothing here
imports Streamlit and nothing here writes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from .errors import CRSError
from .store import Workspace, contains_clause

SNIPPET = 160


class ViewError(CRSError):
    """A view cannot be shown as asked (unknown selection, ...)."""


# ---------------------------------------------------------------------------- versioning
_VERSION_SQL = """
SELECT (SELECT count(*) FROM items), (SELECT count(*) FROM reviews), (SELECT count(*) FROM interactions),
       (SELECT count(*) FROM dialogue_turns), (SELECT count(*) FROM embedding_sets),
       (SELECT max(created_at) FROM embedding_sets), (SELECT count(*) FROM clusterings),
       (SELECT max(created_at) FROM clusterings), (SELECT count(*) FROM projections),
       (SELECT count(*) FROM selections), (SELECT max(created_at) FROM selections),
       (SELECT count(*) FROM synthetic_queries), (SELECT coalesce(sum(version), 0) FROM synthetic_queries),
       (SELECT count(*) FROM ground_truth), (SELECT count(*) FROM query_history),
       (SELECT count(*) FROM augmented_labels), (SELECT count(*) FROM jobs),
       (SELECT string_agg(status, ',' ORDER BY job_id) FROM jobs), (SELECT count(*) FROM runs),
       (SELECT count(*) FROM metrics), (SELECT count(*) FROM budget_curve_points),
       (SELECT count(*) FROM budget_curve_experiments)
"""


def data_version(ws: Workspace) -> str:
    """A short fingerprint that changes whenever a page-visible table changes (cheap)."""
    row = ws.cursor().execute(_VERSION_SQL).fetchone()
    return hashlib.sha1(repr(row).encode()).hexdigest()[:12]


def counts(ws: Workspace) -> dict[str, int]:
    return ws.status()


# ---------------------------------------------------------------------------------- seeds
def genres(ws: Workspace) -> list[str]:
    frame = ws.df("SELECT DISTINCT unnest(string_split(genres, '|')) AS g FROM items WHERE genres IS NOT NULL")
    return sorted(g for g in frame["g"].dropna().astype(str) if g.strip())


@dataclass(frozen=True)
class TablePage:
    """One page of a table read from DuckDB (LIMIT / OFFSET): its rows, the number of rows that
    match the filters, and the page shown (0-based), so a page never loads every matching row."""

    rows: pd.DataFrame
    total: int
    page: int
    page_size: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.page_size))

    def caption(self, what: str) -> str:
        """'Rows 501–1,000 of 12,345 matching reviews (page 2 of 25)' for the table's caption."""
        if not len(self.rows):
            return f"No matching {what}"
        first = self.page * self.page_size + 1
        return (f"Rows {first:,}–{first + len(self.rows) - 1:,} of {self.total:,} matching {what} "
                f"(page {self.page + 1:,} of {self.pages:,})")


def _page_bounds(page: int, page_size: int, total: int) -> tuple[int, int]:
    """(page, page size) with the page clamped to the pages there are: a page number left over
    from a wider filter shows the last page rather than nothing."""
    page_size = int(page_size)
    if page_size < 1:
        raise ViewError(f"page size must be at least 1, got {page_size}")
    last = max(0, -(-int(total) // page_size) - 1)
    return min(max(0, int(page)), last), page_size


_ITEMS_FROM = (
    "WITH r AS (SELECT item_id, count(*) AS n_reviews, avg(rating) AS avg_rating FROM reviews GROUP BY item_id), "
    "x AS (SELECT item_id, count(*) AS n_interactions FROM interactions GROUP BY item_id) "
    "SELECT {cols} FROM items i LEFT JOIN r USING (item_id) LEFT JOIN x USING (item_id) "
)
_ITEMS_COLS = ("i.item_id, i.title, i.year, i.genres, coalesce(r.n_reviews, 0) AS n_reviews, r.avg_rating, "
               "coalesce(x.n_interactions, 0) AS n_interactions, i.directors, i.sources")


def _items_where(search: str, genre_filter: Sequence[str], only_reviewed: bool) -> tuple[str, list]:
    where, params = [], []
    if search.strip():
        clause, args = contains_clause(search, "i.title", "i.item_id", "coalesce(i.plot, '')")
        where.append(clause)
        params += args
    for g in genre_filter:
        where.append("list_contains(string_split(coalesce(i.genres, ''), '|'), ?)")
        params.append(str(g))
    if only_reviewed:
        where.append("coalesce(r.n_reviews, 0) > 0")
    return ("WHERE " + " AND ".join(where) + " " if where else ""), params


def items_table(ws: Workspace, search: str = "", genre_filter: Sequence[str] = (), only_reviewed: bool = False,
                limit: int = 500, offset: int = 0) -> pd.DataFrame:
    """Catalog items with review / interaction counts, best known first."""
    where, params = _items_where(search, genre_filter, only_reviewed)
    sql = (_ITEMS_FROM.format(cols=_ITEMS_COLS) + where
           + "ORDER BY n_reviews DESC, n_interactions DESC, i.title, i.item_id LIMIT ? OFFSET ?")
    return ws.df(sql, params + [int(limit), max(0, int(offset))])


def items_count(ws: Workspace, search: str = "", genre_filter: Sequence[str] = (), only_reviewed: bool = False) -> int:
    """How many items `items_table` would list without a limit."""
    where, params = _items_where(search, genre_filter, only_reviewed)
    return int(ws.scalar(_ITEMS_FROM.format(cols="count(*)") + where, params))


def items_page(ws: Workspace, search: str = "", genre_filter: Sequence[str] = (), only_reviewed: bool = False,
               page: int = 0, page_size: int = 500) -> TablePage:
    """Page ``page`` (0-based, clamped to the last page) of `items_table` and the number of
    matching items."""
    total = items_count(ws, search, genre_filter, only_reviewed)
    page, page_size = _page_bounds(page, page_size, total)
    rows = items_table(ws, search, genre_filter, only_reviewed, page_size, page * page_size)
    return TablePage(rows, total, page, page_size)


def item_detail(ws: Workspace, item_id: str) -> dict[str, Any] | None:
    """Every stored field of one catalog item (the Seeds page's detail panel: the table
    shows short columns only, long text such as the plot is read here)."""
    frame = ws.df("SELECT * FROM items WHERE item_id = ?", [item_id])
    if frame.empty:
        return None
    row = frame.iloc[0].to_dict()
    return {k: v for k, v in row.items() if v is not None and not (isinstance(v, float) and np.isnan(v))}


def rating_range(ws: Workspace) -> tuple[float, float]:
    lo, hi = ws.cursor().execute("SELECT min(rating), max(rating) FROM reviews").fetchone()
    return (float(lo), float(hi)) if lo is not None else (0.0, 10.0)


def _reviews_query(search: str, genre_filter: Sequence[str], rating: tuple[float, float] | None,
                   clustering_id: str | None, clusters: Sequence[int], item_id: str | None,
                   unit_ids: Sequence[str] | None) -> tuple[str, str, list]:
    """(cluster column, FROM ... WHERE ... clause, its parameters) of the reviews table's filters."""
    where, params = [], []
    if search.strip():
        clause, args = contains_clause(search, "r.text", "i.title")
        where.append(clause)
        params += args
    for g in genre_filter:
        where.append("list_contains(string_split(coalesce(i.genres, ''), '|'), ?)")
        params.append(str(g))
    if rating is not None:
        where.append("r.rating BETWEEN ? AND ?")
        params += [float(rating[0]), float(rating[1])]
    if item_id:
        where.append("r.item_id = ?")
        params.append(item_id)
    if unit_ids is not None:
        where.append("r.review_id IN (SELECT unnest(?::VARCHAR[]))")
        params.append([str(u) for u in unit_ids])
    cluster_sql = "NULL::INTEGER AS cluster"
    join = ""
    if clustering_id:
        cluster_sql = "a.cluster"
        join = "LEFT JOIN cluster_assignments a ON a.unit_id = r.review_id AND a.clustering_id = ? "
        params = [clustering_id] + params
        if clusters:
            where.append("a.cluster IN (SELECT unnest(?::INTEGER[]))")
            params.append([int(c) for c in clusters])
    body = ("FROM reviews r LEFT JOIN items i ON i.item_id = r.item_id " + join
            + ("WHERE " + " AND ".join(where) + " " if where else ""))
    return cluster_sql, body, params


def reviews_table(ws: Workspace, search: str = "", genre_filter: Sequence[str] = (),
                  rating: tuple[float, float] | None = None, clustering_id: str | None = None,
                  clusters: Sequence[int] = (), item_id: str | None = None, unit_ids: Sequence[str] | None = None,
                  limit: int = 500, snippet: int | None = None, offset: int = 0) -> pd.DataFrame:
    """Reviews joined with their item (and cluster, given a clustering), filtered, in review id
    order from row ``offset`` on.

    With ``snippet``, ``text`` holds at most that many characters (plus an ellipsis when cut):
    a table of 500 full reviews is megabytes the browser must receive and lay out, while a reader
    opens one review at a time (`review_text`). Search still looks at the whole text."""
    cluster_sql, body, params = _reviews_query(search, genre_filter, rating, clustering_id, clusters, item_id,
                                               unit_ids)
    text_sql = "r.text"
    if snippet is not None:
        text_sql = (f"CASE WHEN length(r.text) > {int(snippet)} THEN left(r.text, {int(snippet)}) || '…' "
                    "ELSE r.text END AS text")
    # the page's ids first, then its columns: sorting every matching row with its text read
    # the whole text column (3x slower for a page of 200k reviews)
    sql = (f"WITH page AS (SELECT r.review_id, {cluster_sql} " + body + "ORDER BY r.review_id LIMIT ? OFFSET ?) "
           f"SELECT r.review_id, i.title, i.year, r.rating, page.cluster, {text_sql}, r.item_id, r.user_id, r.source "
           "FROM page JOIN reviews r USING (review_id) LEFT JOIN items i ON i.item_id = r.item_id ORDER BY r.review_id")
    return ws.df(sql, params + [int(limit), max(0, int(offset))])


def reviews_count(ws: Workspace, search: str = "", genre_filter: Sequence[str] = (),
                  rating: tuple[float, float] | None = None, clustering_id: str | None = None,
                  clusters: Sequence[int] = (), item_id: str | None = None,
                  unit_ids: Sequence[str] | None = None) -> int:
    """How many reviews `reviews_table` would list without a limit."""
    _, body, params = _reviews_query(search, genre_filter, rating, clustering_id, clusters, item_id, unit_ids)
    return int(ws.scalar("SELECT count(*) " + body, params))


def reviews_page(ws: Workspace, search: str = "", genre_filter: Sequence[str] = (),
                 rating: tuple[float, float] | None = None, clustering_id: str | None = None,
                 clusters: Sequence[int] = (), page: int = 0, page_size: int = 500,
                 snippet: int | None = None) -> TablePage:
    """Page ``page`` (0-based, clamped to the last page) of `reviews_table` and the number of
    matching reviews."""
    total = reviews_count(ws, search, genre_filter, rating, clustering_id, clusters)
    page, page_size = _page_bounds(page, page_size, total)
    rows = reviews_table(ws, search, genre_filter, rating, clustering_id, clusters, None, None, page_size, snippet,
                         page * page_size)
    return TablePage(rows, total, page, page_size)


def review_text(ws: Workspace, review_id: str) -> str | None:
    """The full text of one review (None when it is not in the workspace)."""
    row = ws.cursor().execute("SELECT text FROM reviews WHERE review_id = ?", [str(review_id)]).fetchone()
    return None if row is None else row[0]


# ---------------------------------------------------------------------- embeddings / map
def embedding_sets(ws: Workspace, unit: str | None = None) -> pd.DataFrame:
    sql = ("SELECT s.set_id, s.unit, s.model, s.dim, s.n, s.created_at, "
           "(SELECT count(*) FROM projections p WHERE p.set_id = s.set_id) AS n_projected "
           "FROM embedding_sets s")
    if unit:
        return ws.df(sql + " WHERE s.unit = ? ORDER BY s.created_at", [unit])
    return ws.df(sql + " ORDER BY s.created_at")


def clusterings(ws: Workspace, set_id: str | None = None) -> pd.DataFrame:
    sql = "SELECT clustering_id, set_id, k, seed, inertia, created_at FROM clusterings"
    if set_id:
        return ws.df(sql + " WHERE set_id = ? ORDER BY k, created_at", [set_id])
    return ws.df(sql + " ORDER BY set_id, k, created_at")


def cluster_sizes(ws: Workspace, clustering_id: str) -> pd.DataFrame:
    frame = ws.df("SELECT cluster, count(*) AS n FROM cluster_assignments WHERE clustering_id = ? "
                  "GROUP BY cluster ORDER BY cluster", [clustering_id])
    frame["share"] = frame["n"] / max(int(frame["n"].sum()), 1)
    return frame


def cluster_top_terms(ws: Workspace, clustering_id: str, n_terms: int = 8,
                      max_texts: int = 20_000) -> pd.DataFrame | None:
    """Distinctive words per cluster (crs_core.cluster.cluster_top_terms over the clustered
    texts, a seeded sample of at most `max_texts`)."""
    from .cluster import cluster_top_terms as top_terms

    unit = ws.scalar("SELECT s.unit FROM clusterings c JOIN embedding_sets s ON s.set_id = c.set_id "
                     "WHERE c.clustering_id = ?", [clustering_id])
    if unit == "review":
        sql = ("SELECT a.cluster, r.text FROM cluster_assignments a JOIN reviews r ON r.review_id = a.unit_id "
               "WHERE a.clustering_id = ? ORDER BY hash(a.unit_id) LIMIT ?")
    else:
        sql = ("SELECT a.cluster, concat_ws(' ', i.title, i.genres, i.plot) AS text FROM cluster_assignments a "
               "JOIN items i ON i.item_id = a.unit_id WHERE a.clustering_id = ? ORDER BY hash(a.unit_id) LIMIT ?")
    frame = ws.df(sql, [clustering_id, int(max_texts)])
    if frame.empty:
        return None
    terms = top_terms(frame["text"].tolist(), frame["cluster"].to_numpy(), n_terms)
    return pd.DataFrame({"cluster": list(terms), "top_terms": [", ".join(t) for t in terms.values()]})


def cluster_hover_lines(terms: pd.DataFrame | None) -> dict[Any, str]:
    """cluster -> 'cluster N: word, word, …' for the map's hover labels (HTML-escaped, and '%'
    doubled away from Plotly's hovertemplate syntax); {} without top terms."""
    if terms is None or terms.empty:
        return {}
    out = {}
    for cluster, words in zip(terms["cluster"], terms["top_terms"]):
        text = (str(words).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
                .replace("%", "&#37;").replace("{", "&#123;").replace("}", "&#125;"))
        out[cluster] = f"<b>cluster {cluster}</b>: {text}"
    return out


def cluster_table(sizes: pd.DataFrame, terms: pd.DataFrame | None) -> pd.DataFrame:
    """The Map's cluster table for a static, wrapping st.table: cluster, reviews, share as a
    percentage, top terms in full (they were cut off in a narrow st.dataframe column)."""
    table = sizes if terms is None else sizes.merge(terms, on="cluster", how="left")
    table = table.rename(columns={"n": "reviews"}).copy()
    table["share"] = [f"{v:.1%}" for v in table["share"]]
    if "top_terms" in table:
        table["top_terms"] = table["top_terms"].fillna("")
    return table.set_index("cluster")


def hover_texts(titles: Sequence[Any], years: Sequence[Any], snippets: Sequence[Any]) -> np.ndarray:
    """'Title (year)<br>snippet…' per point, the data HTML-escaped (Plotly renders a few tags in
    hover labels; data must show as text). Vectorised: the map has tens of thousands of points."""
    def esc(values: pd.Series) -> pd.Series:
        return (values.str.replace("&", "&amp;", regex=False).str.replace("<", "&lt;", regex=False)
                .str.replace(">", "&gt;", regex=False).str.replace('"', "&quot;", regex=False)
                .str.replace("'", "&#x27;", regex=False))

    title = esc(pd.Series(titles, dtype=object).fillna("").astype(str)).replace("", "?")
    year = pd.to_numeric(pd.Series(years, dtype=object), errors="coerce")
    year = year.map(lambda y: "" if pd.isna(y) else str(int(y))).astype(object)  # object even when empty
    snippet = esc(pd.Series(snippets, dtype=object).fillna("").astype(str))
    return (title + " (" + year + ")<br>" + snippet + "…").to_numpy(dtype=object)


MAP_MAX_POINTS = 50_000  # the map draws a sample past this: every point's hover text travels to the browser


def map_points(ws: Workspace, set_id: str, clustering_id: str | None = None, snippet: int = SNIPPET,
               max_points: int | None = None) -> pd.DataFrame:
    """The 2-D projection of a set with cluster, item title, a text snippet and the hover text
    (`hover_texts`) per point.

    With ``max_points``, a set with more points gives a deterministic sample of that many
    (the points of lowest hash of their unit id: the same points at every call, and a point
    stays in the sample as the set grows unless lower hashes crowd it out); `embedding_sets`
    tells how many points the map has in all (``n_projected``)."""
    unit = ws.scalar("SELECT unit FROM embedding_sets WHERE set_id = ?", [set_id]) or "review"
    cluster = "a.cluster" if clustering_id else "NULL::INTEGER"
    params: list[Any] = []
    join = ""
    if clustering_id:
        join = "LEFT JOIN cluster_assignments a ON a.unit_id = p.unit_id AND a.clustering_id = ? "
        params.append(clustering_id)
    source = "projections p "
    if max_points is not None:
        source = "(SELECT * FROM projections WHERE set_id = ? ORDER BY hash(unit_id), unit_id LIMIT ?) p "
        params = [set_id, max(1, int(max_points))] + params
    if unit == "review":
        sql = (f"SELECT p.unit_id, p.x, p.y, {cluster} AS cluster, r.item_id, i.title, i.year, "
               f"left(r.text, {int(snippet)}) AS snippet FROM {source}"
               "LEFT JOIN reviews r ON r.review_id = p.unit_id LEFT JOIN items i ON i.item_id = r.item_id " + join)
    else:
        sql = (f"SELECT p.unit_id, p.x, p.y, {cluster} AS cluster, i.item_id, i.title, i.year, "
               f"left(coalesce(i.plot, ''), {int(snippet)}) AS snippet FROM {source}"
               "LEFT JOIN items i ON i.item_id = p.unit_id " + join)
    frame = ws.df(sql + "WHERE p.set_id = ? ORDER BY p.unit_id", params + [set_id])
    frame["hover"] = hover_texts(frame["title"], frame["year"], frame["snippet"])
    return frame


# ----------------------------------------------------------------------------- selections
def selections(ws: Workspace) -> pd.DataFrame:
    return ws.df(
        "SELECT s.selection_id, s.name, s.strategy, s.unit, s.set_id, s.budget, s.params, s.summary, "
        "s.parent_id, s.created_at, (SELECT count(*) FROM selection_picks p WHERE p.selection_id = s.selection_id) "
        "AS n_picks FROM selections s ORDER BY s.created_at DESC, s.selection_id"
    )


def selection_picks(ws: Workspace, selection_id: str, clustering_id: str | None = None) -> pd.DataFrame:
    """Picks in order, joined with their review/item (and cluster and map position when known).

    An item pick over a map of reviews (a selection with unit "item" made from review
    embeddings: the item is the mean of its reviews) is placed at the centroid of its reviews'
    map positions."""
    sel = ws.df("SELECT s.unit, s.set_id, e.unit AS set_unit FROM selections s "
                "LEFT JOIN embedding_sets e USING (set_id) WHERE s.selection_id = ?", [selection_id])
    if sel.empty:
        raise ViewError(f"no selection {selection_id!r} in the workspace")
    unit, set_id, set_unit = sel.iloc[0]["unit"], sel.iloc[0]["set_id"], sel.iloc[0]["set_unit"]
    positions = "projections"
    if unit == "item" and set_unit == "review":
        positions = ("(SELECT q.set_id, r.item_id AS unit_id, avg(q.x) AS x, avg(q.y) AS y FROM projections q "
                     "JOIN reviews r ON r.review_id = q.unit_id GROUP BY q.set_id, r.item_id)")
    params: list[Any] = [set_id]
    cluster, join = "NULL::INTEGER", ""
    if clustering_id:
        cluster, join = "a.cluster", "LEFT JOIN cluster_assignments a ON a.unit_id = p.unit_id AND a.clustering_id = ? "
        params.append(clustering_id)
    if unit == "review":
        body = ("LEFT JOIN reviews r ON r.review_id = p.unit_id LEFT JOIN items i ON i.item_id = r.item_id ")
        cols = "r.item_id, i.title, i.year, i.genres, r.rating, r.text"
    else:
        body = "LEFT JOIN items i ON i.item_id = p.unit_id "
        cols = "i.item_id, i.title, i.year, i.genres, NULL AS rating, i.plot AS text"
    sql = (f"SELECT p.rank, p.unit_id, p.score, p.round, {cluster} AS cluster, m.x, m.y, {cols} "
           f"FROM selection_picks p LEFT JOIN {positions} m ON m.unit_id = p.unit_id AND m.set_id = ? "
           + body + join + "WHERE p.selection_id = ? ORDER BY p.rank")
    return ws.df(sql, params + [selection_id])


def selection_cluster_histogram(ws: Workspace, selection_ids: Sequence[str], clustering_id: str) -> pd.DataFrame:
    """Share of each selection's picks per cluster (plus the whole set's share), long form."""
    frame = ws.df(
        "SELECT p.selection_id, a.cluster, count(*) AS n FROM selection_picks p "
        "JOIN cluster_assignments a ON a.unit_id = p.unit_id AND a.clustering_id = ? "
        "WHERE p.selection_id IN (SELECT unnest(?::VARCHAR[])) GROUP BY ALL",
        [clustering_id, list(selection_ids)],
    )
    base = cluster_sizes(ws, clustering_id).assign(selection_id="(all rows)")
    frame["share"] = frame["n"] / frame.groupby("selection_id")["n"].transform("sum")
    return pd.concat([base[["selection_id", "cluster", "n", "share"]], frame], ignore_index=True)


def selection_summary(ws: Workspace, selection_id: str) -> dict[str, Any]:
    raw = ws.scalar("SELECT summary FROM selections WHERE selection_id = ?", [selection_id])
    try:
        return json.loads(raw) if raw else {}
    except (TypeError, ValueError):
        return {}


# --------------------------------------------------------------------- review / catalog
def catalog_search(ws: Workspace, text: str, limit: int = 20) -> pd.DataFrame:
    """Items whose title matches `text` (case-insensitive), best known first: for adding to a list."""
    if not text or not text.strip():
        return pd.DataFrame(columns=["item_id", "title", "year", "genres"])
    title_matches, args = contains_clause(text, "title")
    return ws.df(
        f"SELECT item_id, title, year, genres FROM items WHERE {title_matches} OR item_id = ? "
        "ORDER BY (lower(title) = lower(?)) DESC, year DESC NULLS LAST, title LIMIT ?",
        args + [text.strip(), text.strip(), int(limit)],
    )


def review_counts(ws: Workspace) -> dict[str, int]:
    frame = ws.df("SELECT status, count(*) AS n FROM synthetic_queries GROUP BY status")
    out = {s: 0 for s in ("pending", "approved", "rejected")}
    out.update({str(s): int(n) for s, n in zip(frame["status"], frame["n"])})
    return out


# ------------------------------------------------------------------------- jobs / runs
def recent_jobs(ws: Workspace, limit: int = 10) -> pd.DataFrame:
    return ws.df("SELECT job_id, kind, status, created_at, finished_at, imported FROM jobs "
                 "ORDER BY created_at DESC LIMIT ?", [int(limit)])


def synthesis_stats(ws: Workspace) -> dict[str, Any]:
    row = ws.cursor().execute(
        "SELECT count(*), coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0), "
        "coalesce(sum(cost), 0) FROM llm_cache").fetchone()
    return {"llm_calls": int(row[0]), "prompt_tokens": int(row[1]), "completion_tokens": int(row[2]),
            "cost": float(row[3]), "queries": ws.count("synthetic_queries")}


def synthesis_counters(ws: Workspace, selection_id: str | None, k_queries: int = 1,
                       items_limit: int | None = None) -> dict[str, Any]:
    """Every counter of the Synthesis page, read in one transaction (one snapshot of the
    workspace, so the plan's "stored" and the workspace's "synthetic queries" agree with each
    other and with what a run has committed, even while the run commits): the plan (items,
    planned, stored; see synth.synthesis_progress) and the workspace totals of `synthesis_stats`."""
    from .synth import synthesis_progress

    cur = ws.cursor()  # this thread's cursor: every read below sees one snapshot of the workspace
    cur.execute("BEGIN TRANSACTION")
    try:
        out: dict[str, Any] = dict(synthesis_stats(ws))
        if selection_id is not None:
            plan = synthesis_progress(ws, selection_id, int(k_queries), items_limit)
            out.update(items=plan["items"], planned=plan["planned"], stored=plan["done"])
    finally:
        cur.execute("ROLLBACK")  # nothing was written
    return out


def augmented_counts(ws: Workspace) -> pd.DataFrame:
    return ws.df("SELECT dataset, scorer, count(*) AS labels, count(DISTINCT turn_id) AS turns, "
                 "avg(score) AS mean_score FROM augmented_labels GROUP BY ALL ORDER BY dataset, scorer")


def dialogue_datasets(ws: Workspace) -> pd.DataFrame:
    return ws.df("SELECT dataset, count(*) AS turns FROM dialogue_turns GROUP BY dataset ORDER BY dataset")


def runs(ws: Workspace) -> pd.DataFrame:
    return ws.df("SELECT run_id, model, training_data, selection_strategy, budget, seed, created_at, "
                 "(SELECT count(*) FROM metrics m WHERE m.run_id = r.run_id) AS n_metrics "
                 "FROM runs r ORDER BY created_at DESC")


def budget_curves(ws: Workspace, metric: str, dataset: str) -> pd.DataFrame:
    """Mean metric per (selection strategy, budget) over runs that name both."""
    return ws.df(
        "SELECT r.selection_strategy AS strategy, r.budget, avg(m.value) AS value, "
        "sqrt(sum(m.stderr * m.stderr)) / count(*) AS stderr, count(*) AS n_runs "
        "FROM metrics m JOIN runs r USING (run_id) WHERE m.metric = ? AND m.dataset = ? "
        "AND r.selection_strategy IS NOT NULL AND r.budget IS NOT NULL GROUP BY ALL ORDER BY strategy, budget",
        [metric, dataset],
    )


def item_titles(ws: Workspace, item_ids: Sequence[str]) -> dict[str, str]:
    frame = ws.df("SELECT item_id, title, year FROM items WHERE item_id IN (SELECT unnest(?::VARCHAR[]))",
                  [[str(i) for i in item_ids]])
    return {r.item_id: (f"{r.title} ({int(r.year)})" if pd.notna(r.year) else str(r.title))
            for r in frame.itertuples(index=False)}


# ------------------------------------------------------------------------------ training
def training_inputs(ws: Workspace, statuses: Sequence[str] = ("approved",), selection_id: str | None = None,
                    extra_dataset: str | None = None) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """(examples, items, info) for `crs_core.train.launch_training` from reviewed synthetic
    dialogues (and optionally the turns of a real training dataset, e.g. inspired_train)."""
    from .recommenders import Catalog, training_set_from_synthetic, training_set_from_turns

    ts = training_set_from_synthetic(ws, tuple(statuses), selection_id)
    examples = [{"context": list(e.context), "labels": list(e.labels)} for e in ts]
    info: dict[str, Any] = {"synthetic": len(examples), "dropped": ts.n_dropped, "real": 0}
    if extra_dataset:
        real = training_set_from_turns(ws, extra_dataset)
        examples += [{"context": list(e.context), "labels": list(e.labels)} for e in real]
        info["real"] = len(real)
    catalog = Catalog.from_workspace(ws)
    items = [{"item_id": i, "text": t} for i, t in zip(catalog.item_ids.tolist(), catalog.texts)]
    info.update(examples=len(examples), items=len(items))
    return examples, items, info


def job_frame(states: Sequence[Any]) -> pd.DataFrame:
    """crs_core.jobs.JobState list -> a table for the Training page."""
    return pd.DataFrame([{"job_id": s.job_id, "kind": s.kind, "state": s.describe(), "step": s.step,
                          "total_steps": s.total_steps, "loss": s.loss, "attempt": s.attempt,
                          "imported": s.imported, "created_at": s.created_at} for s in states],
                        columns=["job_id", "kind", "state", "step", "total_steps", "loss", "attempt", "imported",
                                 "created_at"])


def turn_context(ws: Workspace, dataset: str, turn_id: str) -> list[str]:
    """The utterances before one dialogue turn (for the evaluation drill-down)."""
    raw = ws.scalar("SELECT context FROM dialogue_turns WHERE dataset = ? AND turn_id = ?", [dataset, turn_id])
    try:
        value = json.loads(raw) if isinstance(raw, str) else (raw or [])
    except ValueError:
        value = [str(raw)]
    return [str(u) for u in value]


def selection_coverage(ws: Workspace, selection_id: str, clustering_id: str | None = None) -> dict[str, Any]:
    """Coverage of a selection computed from the tables (works for any stored selection):
    picks, distinct items and their share of the set's items, and with a clustering the share
    of clusters hit and the normalised entropy of the picks' cluster histogram."""
    sel = ws.df("SELECT unit, set_id FROM selections WHERE selection_id = ?", [selection_id])
    if sel.empty:
        raise ViewError(f"no selection {selection_id!r} in the workspace")
    unit, set_id = sel.iloc[0]["unit"], sel.iloc[0]["set_id"]
    item_of = ("(SELECT item_id FROM reviews r WHERE r.review_id = {col})" if unit == "review" else "{col}")
    picked_items, n_picks = ws.cursor().execute(
        f"SELECT count(DISTINCT {item_of.format(col='p.unit_id')}), count(*) FROM selection_picks p "
        "WHERE p.selection_id = ?", [selection_id]).fetchone()
    set_items = ws.scalar(f"SELECT count(DISTINCT {item_of.format(col='e.unit_id')}) FROM embedding_rows e "
                          "WHERE e.set_id = ?", [set_id]) or 0
    out: dict[str, Any] = {"n_picks": int(n_picks), "items": int(picked_items),
                           "item_coverage": picked_items / set_items if set_items else None,
                           "cluster_coverage": None, "cluster_entropy_norm": None}
    if clustering_id:
        hist = ws.df("SELECT a.cluster, count(*) AS n FROM selection_picks p JOIN cluster_assignments a "
                     "ON a.unit_id = p.unit_id AND a.clustering_id = ? WHERE p.selection_id = ? GROUP BY a.cluster",
                     [clustering_id, selection_id])
        k = int(ws.scalar("SELECT count(DISTINCT cluster) FROM cluster_assignments WHERE clustering_id = ?",
                          [clustering_id]) or 0)
        if k and len(hist):
            f = hist["n"].to_numpy(dtype=float) / hist["n"].sum()
            out["cluster_coverage"] = len(hist) / k
            out["cluster_entropy_norm"] = float(-(f * np.log(f)).sum() / np.log(k)) if k > 1 else 0.0
    return out


def cluster_palette(n: int) -> list[str]:
    """n colours that can be told apart: Plotly's 26-colour Alphabet palette (the default
    10-colour cycle made cluster 0 and cluster 10 look the same), evenly spaced hues past 26."""
    from plotly.colors import qualitative

    if n <= len(qualitative.Alphabet):
        return list(qualitative.Alphabet[:n])
    import colorsys

    return ["#%02x%02x%02x" % tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / n, 0.75, 0.85 - 0.25 * (i % 2)))
            for i in range(n)]


def progress_frame(points: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """A job's progress lines (`jobs.read_progress`) as a table for the charts: one row per
    logged step with the step, epoch, loss and learning rate that were reported (columns that
    no line carries are left out, so a chart is drawn only for what the job logs)."""
    frame = pd.DataFrame(list(points))
    if frame.empty or "step" not in frame:
        return pd.DataFrame(columns=["step"])
    keep = ["step"] + [c for c in ("epoch", "loss", "lr") if c in frame and frame[c].notna().any()]
    frame = frame[keep].drop_duplicates("step", keep="last").sort_values("step")
    return frame.rename(columns={"lr": "learning_rate"}).reset_index(drop=True)


def results_frame(results: Mapping[str, Any], label: str) -> pd.DataFrame:
    """EvalResults {dataset: result} -> rows (run, dataset, metric, value, stderr, n_turns, k)
    shaped like `evaluate.metrics_frame`, so an ad-hoc result is charted beside stored runs."""
    rows = []
    for ds, res in results.items():
        for metric, (value, stderr) in res.metrics.items():
            family, _, k = metric.partition("@")
            rows.append({"run": label, "dataset": ds, "metric": metric, "family": family,
                         "k": int(k) if k.isdigit() else None, "value": float(value),
                         "stderr": None if stderr is None else float(stderr), "n_turns": int(res.n_turns)})
    return pd.DataFrame(rows, columns=["run", "dataset", "metric", "family", "k", "value", "stderr", "n_turns"])
