"""One item table from several movie catalogs, with stable ids and the source ids kept.

Item ids are stable across rebuilds and readable: the IMDb id (`tt0133093`) where one is known,
otherwise `<source>:<source id>` (`redial:12345`, `inspired:67`). Unification order:

1. ReDial catalog (`id2info.json`: plots, genres, cast, IMDb ids) — the richest metadata.
2. ReDial movie list (`movies_with_mentions.csv`) for ReDial movies missing from (1), with the
   ReDial→IMDb links of the ReDial–MovieLens map where they exist.
3. MovieLens movies (+ links): joined on IMDb id; new items otherwise.
4. INSPIRED catalog (no IMDb ids): joined by title and year with `TitleMatcher` (exact tiers
   only, so a weak fuzzy hit never merges two films); new items otherwise.

ReDial movies sharing an IMDb id (the catalog lists many films twice, with and without year)
become one item whose `redial_id` holds both ids ('|'-separated); `CatalogReport.conflicts`
counts them. Movies that only dialogue files name (the INSPIRED movie database is not
available) are added as title-only items with source `dialogue`, so that every test target
that can be named is a catalog item.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from .titles import TitleMatcher, parse_title

ITEM_COLUMNS = [
    "item_id", "title", "year", "genres", "plot", "directors", "cast_names", "imdb_id",
    "redial_id", "inspired_id", "movielens_id", "sources",
]


@dataclass
class CatalogReport:
    counts: dict[str, int] = field(default_factory=dict)
    conflicts: int = 0  # ReDial movies sharing an IMDb id, merged into one item


def _join(values) -> str:
    seen: list[str] = []
    for v in values or []:
        v = str(v).strip()
        if v and v not in seen:
            seen.append(v)
    return "|".join(seen)


class CatalogBuilder:
    """Accumulates items from catalogs in priority order; earlier sources win per field."""

    def __init__(self) -> None:
        self.items: dict[str, dict] = {}
        self.by_imdb: dict[str, str] = {}
        self.by_redial: dict[str, str] = {}
        self.by_movielens: dict[int, str] = {}
        self.report = CatalogReport()

    # -- helpers ---------------------------------------------------------------------------
    def _new(self, item_id: str, raw_title: str, year, source: str) -> dict:
        title, parsed_year = parse_title(raw_title)
        item = {c: None for c in ITEM_COLUMNS}
        item.update(item_id=item_id, title=title or raw_title.strip(),
                    year=int(year) if pd.notna(year) and year is not None else parsed_year,
                    sources=source)
        self.items[item_id] = item
        return item

    @staticmethod
    def _fill(item: dict, row: dict, source: str) -> None:
        if item.get("year") is None and row.get("year") is not None and pd.notna(row.get("year")):
            item["year"] = int(row["year"])
        if not item.get("genres") and len(row.get("genres") or []):
            item["genres"] = _join(g.lower() for g in row["genres"])
        if not item.get("plot") and row.get("plot"):
            item["plot"] = row["plot"]
        if not item.get("directors") and len(row.get("directors") or []):
            item["directors"] = _join(row["directors"])
        if not item.get("cast_names") and len(row.get("cast") or []):
            item["cast_names"] = _join(row["cast"])
        if source not in (item["sources"] or "").split("|"):
            item["sources"] = _join([*(item["sources"] or "").split("|"), source])

    # -- sources, in priority order ----------------------------------------------------------
    def add_redial(self, redial: pd.DataFrame, imdb_hint: dict[str, str] | None = None) -> None:
        """ReDial movies (id2info rows first, then title-only rows); `imdb_hint`: redial id -> tt id."""
        imdb_hint = imdb_hint or {}
        for row in redial.to_dict("records"):
            rid = str(row["item_key"])
            if rid in self.by_redial:
                existing = self.items[self.by_redial[rid]]
                self._fill(existing, row, "redial")
                continue
            imdb = row.get("imdb_id") or imdb_hint.get(rid)
            if imdb and imdb in self.by_imdb:
                # ReDial lists many films twice (e.g. "Jurassic Park" and "Jurassic Park (1993)"):
                # one IMDb id means one item, reachable from both ReDial ids.
                self.report.conflicts += 1
                item = self.items[self.by_imdb[imdb]]
                item["redial_id"] = _join([*(item["redial_id"] or "").split("|"), rid])
            else:
                item = self._new(imdb or f"redial:{rid}", row["title"], row.get("year"), "redial")
                item["redial_id"] = rid
                item["imdb_id"] = imdb
                if imdb:
                    self.by_imdb[imdb] = item["item_id"]
            self._fill(item, row, "redial")
            self.by_redial[rid] = item["item_id"]

    def add_movielens(self, movies: pd.DataFrame) -> None:
        for row in movies.to_dict("records"):
            ml_id = int(row["item_key"])
            imdb = row.get("imdb_id")
            item_id = self.by_imdb.get(imdb) if imdb else None
            if item_id is None:
                item = self._new(imdb or f"movielens:{ml_id}", row["title"], row.get("year"), "movielens")
                item["imdb_id"] = imdb
                if imdb:
                    self.by_imdb[imdb] = item["item_id"]
            else:
                item = self.items[item_id]
            if item.get("movielens_id") is None:
                item["movielens_id"] = ml_id
                self.by_movielens[ml_id] = item["item_id"]
            self._fill(item, row, "movielens")

    def add_inspired(self, inspired: pd.DataFrame) -> None:
        matcher = TitleMatcher((i["item_id"], i["title"], i["year"]) for i in self.items.values())
        for row in inspired.to_dict("records"):
            hit = matcher.match(row["title"], row.get("year") if pd.notna(row.get("year")) else None)
            if hit is not None and hit.method == "exact" and self.items[hit.item_id]["inspired_id"] is None:
                item = self.items[hit.item_id]
            else:
                item = self._new(f"inspired:{row['item_key']}", row["title"], row.get("year"), "inspired")
            item["inspired_id"] = str(row["item_key"])
            self._fill(item, row, "inspired")

    def add_titles(self, titles: list[str], source: str) -> list[str]:
        """Title-only items for movies that no catalog lists (named by dialogue files)."""
        added = []
        for raw in titles:
            title, year = parse_title(raw)
            item_id = f"{source}:{title.lower()} ({year})" if year else f"{source}:{title.lower()}"
            if item_id not in self.items:
                self._new(item_id, raw, year, source)
                added.append(item_id)
        return added

    def frame(self) -> pd.DataFrame:
        df = pd.DataFrame(list(self.items.values()), columns=ITEM_COLUMNS)
        df["year"] = df["year"].astype("Int64")
        df["movielens_id"] = df["movielens_id"].astype("Int64")
        for col in ("genres", "plot", "directors", "cast_names"):
            df[col] = df[col].fillna("")
        self.report.counts = {
            "items": len(df),
            "with_imdb": int(df["imdb_id"].notna().sum()),
            "redial": int(df["redial_id"].notna().sum()),
            "inspired": int(df["inspired_id"].notna().sum()),
            "movielens": int(df["movielens_id"].notna().sum()),
            "with_plot": int((df["plot"] != "").sum()),
        }
        return df


def item_text(row: dict) -> str:
    """The text that describes an item to an encoder: title, year, genres, plot, cast.

    The one item text of the studio: synthesis retrieval, augmentation, selection metadata,
    training and the dense recommenders all embed this, so their MiniLM cache entries are shared."""
    parts = [display_title(row["title"], row.get("year")) + "."]
    if row.get("genres"):
        parts.append("Genres: " + row["genres"].replace("|", ", ") + ".")
    if row.get("plot"):
        parts.append(row["plot"])
    if row.get("cast_names"):
        parts.append("Starring " + ", ".join(row["cast_names"].split("|")[:4]) + ".")
    return " ".join(parts)


def display_title(title: str, year) -> str:
    """'Title (Year)'; a year read as a float (1995.0, from a column with NULLs) prints as 1995."""
    return f"{title} ({int(year)})" if year is not None and pd.notna(year) else title
