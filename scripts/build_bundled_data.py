#!/usr/bin/env python3
"""Rebuild data/bundled/ (the studio's default inputs) from the shared raw data folder.

    python scripts/build_bundled_data.py --shared ../shared/data

    python scripts/build_bundled_data.py --vectors-from data/workspaces/default.duckdb

Copies the files the default workspace is built from, each folder with its SOURCE note,
and filters the IMDb reviews to the movies the catalog can name (an IMDb id known to the
ReDial catalog or to MovieLens links): a review that cannot be tied to a titled item is no
use as a seed. Everything else is copied byte for byte; ingest does the joins.

``--vectors-from`` exports the review vectors and 2-D map of a workspace built by
``python -m crs_core init`` (the slow path: every review encoded here) into
``data/bundled/review_vectors/``, so that later first starts skip the encoding; see
``crs_core/prebuilt.py`` for how they are checked before use.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (source path relative to --shared, destination relative to data/bundled)
COPIES = [
    ("movie_catalog/SOURCE.md", "movie_catalog/SOURCE.md"),
    ("movie_catalog/redial_cfcrs/id2info.json", "movie_catalog/redial_cfcrs/id2info.json"),
    ("movie_catalog/inspired_cfcrs/id2info_inspired.json", "movie_catalog/inspired_cfcrs/id2info_inspired.json"),
    ("movie_catalog/redial_movielens_map/movies_data.csv", "movie_catalog/redial_movielens_map/movies_data.csv"),
    ("movielens_small/SOURCE.md", "movielens_small/SOURCE.md"),
    ("movielens_small/README.txt", "movielens_small/README.txt"),
    ("movielens_small/movies.csv", "movielens_small/movies.csv"),
    ("movielens_small/links.csv", "movielens_small/links.csv"),
    ("movielens_small/ratings.csv", "movielens_small/ratings.csv"),
    ("movielens_small/tags.csv", "movielens_small/tags.csv"),
    ("redial/SOURCE.md", "redial/SOURCE.md"),
    ("redial/original/test_data.jsonl", "redial/original/test_data.jsonl"),
    ("redial/original/movies_with_mentions.csv", "redial/original/movies_with_mentions.csv"),
    ("redial/llms_zero_shot/test.jsonl", "redial/llms_zero_shot/test.jsonl"),
    ("redial/llms_zero_shot/entity2id.json", "redial/llms_zero_shot/entity2id.json"),
    ("redial/llms_zero_shot/item_ids.json", "redial/llms_zero_shot/item_ids.json"),
    ("inspired/SOURCE.md", "inspired/SOURCE.md"),
    ("inspired/llms_zero_shot/test.jsonl", "inspired/llms_zero_shot/test.jsonl"),
    ("inspired/llms_zero_shot/entity2id.json", "inspired/llms_zero_shot/entity2id.json"),
    ("inspired/llms_zero_shot/item_ids.json", "inspired/llms_zero_shot/item_ids.json"),
    ("inspired/unicrs_dbpedia/train_data_dbpedia.jsonl", "inspired/unicrs_dbpedia/train_data_dbpedia.jsonl"),
    ("inspired/unicrs_dbpedia/test_data_dbpedia.jsonl", "inspired/unicrs_dbpedia/test_data_dbpedia.jsonl"),
    ("inspired/cfcrs/test_data.jsonl", "inspired/cfcrs/test_data.jsonl"),
]

REVIEWS_NOTE = """

## What data/bundled/ keeps of it
`imdb_reviews/imdb_reviews_catalog.jsonl.gz` holds the reviews (same fields, same order) whose
`imdb_id` is known to the ReDial catalog (`id2info.json`, field `imdb_id`) or to MovieLens
`links.csv`, so that each review is tied to an item with a title and year. Rebuilt by
`python scripts/build_bundled_data.py --shared ../shared/data`.
"""


def catalog_imdb_ids(shared: Path) -> set[str]:
    info = json.loads((shared / "movie_catalog/redial_cfcrs/id2info.json").read_text())
    ids = {v["imdb_id"] for v in info.values() if v.get("imdb_id")}
    with open(shared / "movielens_small/links.csv", newline="") as fh:
        ids |= {"tt" + row["imdbId"].zfill(7) for row in csv.DictReader(fh) if row["imdbId"]}
    return ids


def filter_reviews(shared: Path, out: Path, keep: set[str]) -> tuple[int, int]:
    kept = total = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 keeps the archive byte-identical across rebuilds
    with gzip.open(shared / "reviews/imdb_reviews.jsonl.gz", "rt", encoding="utf-8") as src, \
            open(out, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as packed, \
            io.TextIOWrapper(packed, encoding="utf-8") as dst:
        for line in src:
            total += 1
            if json.loads(line)["imdb_id"] in keep:
                dst.write(line)
                kept += 1
    return kept, total


def export_vectors(workspace: Path, folder: Path) -> int:
    sys.path.insert(0, str(ROOT))
    from crs_core.pipeline import REVIEW_SET
    from crs_core.prebuilt import write_bundle
    from crs_core.store import Workspace

    with Workspace(workspace, read_only=True) as ws:
        manifest = write_bundle(ws, REVIEW_SET, folder,
                                command="python -m crs_core init (every review encoded), then "
                                        "python scripts/build_bundled_data.py --vectors-from WORKSPACE")
    print(f"wrote {manifest['n']:,} vectors ({manifest['dtype']}) and the map of {REVIEW_SET} into {folder}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"),
                        help="the shared raw data folder (default: ../shared/data)")
    parser.add_argument("--out", default=str(ROOT / "data" / "bundled"), help="destination folder")
    parser.add_argument("--vectors-from", metavar="WORKSPACE",
                        help="only export the review vectors and map of this built workspace "
                             "into OUT/review_vectors")
    args = parser.parse_args(argv)
    if args.vectors_from:
        return export_vectors(Path(args.vectors_from), Path(args.out) / "review_vectors")
    shared, out = Path(args.shared), Path(args.out)
    if not (shared / "reviews/imdb_reviews.jsonl.gz").exists():
        print(f"error: {shared} does not look like the shared data folder", file=sys.stderr)
        return 2
    for src, dst in COPIES:
        target = out / dst
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared / src, target)
    kept, total = filter_reviews(shared, out / "imdb_reviews/imdb_reviews_catalog.jsonl.gz",
                                 catalog_imdb_ids(shared))
    note = (shared / "reviews/SOURCE.md").read_text() + REVIEWS_NOTE
    note += f"\nCounts: {kept:,} of {total:,} reviews kept.\n"
    (out / "imdb_reviews/SOURCE.md").write_text(note)
    print(f"bundled {len(COPIES)} files and {kept:,} of {total:,} reviews into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
