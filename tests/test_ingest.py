"""Ingest of the real bundled data, and of a user's own files, all-or-nothing."""

import gzip
import json
from pathlib import Path

import pytest

from crs_core.errors import InputError
from crs_core.ingest import BUNDLED, ingest_default, ingest_file, ingest_summary
from crs_core.store import Workspace

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("ingest") / "w.duckdb")
    report = ingest_default(ws)
    yield ws, report
    ws.close()


def _share(text: str) -> float:
    found, total = (int(x.replace(",", "")) for x in text.split(" (")[0].split(" / "))
    return found / total


def test_bundled_data_counts(ingested):
    ws, report = ingested
    assert ws.count("reviews") == 16_740
    assert ws.count("items") > 12_000
    assert ws.count("interactions") == 100_004
    turns = ws.df("SELECT dataset, count(*) AS n FROM dialogue_turns GROUP BY dataset")
    assert dict(zip(turns["dataset"], turns["n"])) == {
        "redial_test": 3552, "inspired_test": 228, "inspired_train": 1801}
    assert report.counts["review_items"] == 1291
    assert ingest_summary(ws)["reviews"] == 16_740


def test_test_targets_are_catalog_items(ingested):
    ws, report = ingested
    assert _share(report.counts["redial_test_targets_found"]) >= 0.99
    assert _share(report.counts["inspired_test_targets_found"]) >= 0.99
    known = set(ws.df("SELECT item_id FROM items")["item_id"])
    recs = ws.df("SELECT rec_items FROM dialogue_turns WHERE dataset = 'redial_test'")["rec_items"]
    assert all(i in known for row in recs for i in json.loads(row))


def test_every_review_is_tied_to_a_titled_item(ingested):
    ws, _ = ingested
    orphans = ws.scalar("""SELECT count(*) FROM reviews r LEFT JOIN items i USING (item_id)
                           WHERE i.item_id IS NULL OR i.title IS NULL OR i.title = ''""")
    assert orphans == 0
    assert ws.scalar("SELECT count(*) FROM reviews WHERE text LIKE '%<br />%'") == 0


def test_catalog_joins_sources_on_one_item(ingested):
    ws, _ = ingested
    matrix = ws.df("SELECT * FROM items WHERE item_id = 'tt0133093'").iloc[0]
    assert matrix["title"] == "The Matrix" and matrix["year"] == 1999
    assert matrix["redial_id"] and matrix["movielens_id"] == 2571
    assert "sci-fi" in matrix["genres"] or "science fiction" in matrix["genres"]
    # ReDial lists Jurassic Park twice; both ids lead to one item
    jp = ws.df("SELECT redial_id FROM items WHERE item_id = 'tt0107290'")["redial_id"].iloc[0]
    assert len(jp.split("|")) >= 2


def test_redial_turn_resolution_uses_dialogue_mentions(ingested):
    ws, _ = ingested
    turn = ws.df("SELECT * FROM dialogue_turns WHERE turn_id = 'test_20001/204172'").iloc[0]
    assert json.loads(turn["rec_items"]) == ["tt0087928"]          # Police Academy (1984)
    assert json.loads(turn["mentioned_items"]) == ["tt0247745"]    # Super Troopers (2001)


def _fresh(tmp_path, items=(("tt0133093", "The Matrix", 1999), ("tt0088247", "The Terminator", 1984))):
    ws = Workspace(tmp_path / "w.duckdb")
    with ws.transaction() as cur:
        for item_id, title, year in items:
            cur.execute("INSERT INTO items (item_id, title, year, imdb_id) VALUES (?, ?, ?, ?)",
                        [item_id, title, year, item_id])
    return ws


def _write_reviews(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _review(rid: str, imdb: str, text: str = "Great film.") -> dict:
    return {"review_id": rid, "imdb_id": imdb, "text": text, "rating": 8, "split": "train",
            "label": "pos", "file": f"train/pos/{rid}.txt"}


def test_user_reviews_of_known_items_are_added(tmp_path):
    with _fresh(tmp_path) as ws:
        path = _write_reviews(tmp_path / "mine.jsonl", [_review("r1", "tt0133093"), _review("r2", "tt0088247")])
        report = ingest_file(ws, path)
        assert report.counts["reviews_added"] == 2
        assert sorted(ws.df("SELECT item_id FROM reviews")["item_id"]) == ["tt0088247", "tt0133093"]


def test_reviews_of_unknown_items_fail_and_write_nothing(tmp_path):
    with _fresh(tmp_path) as ws:
        path = _write_reviews(tmp_path / "mine.jsonl", [_review("r1", "tt0133093"), _review("r2", "tt9999999")])
        with pytest.raises(InputError, match="not in the catalog.*tt9999999"):
            ingest_file(ws, path)
        assert ws.count("reviews") == 0


def test_skip_bad_reports_what_was_skipped(tmp_path):
    with _fresh(tmp_path) as ws:
        path = tmp_path / "mine.jsonl"
        _write_reviews(path, [_review("r1", "tt0133093"), _review("r2", "tt9999999")])
        with path.open("a") as fh:
            fh.write('{"review_id": "r3", "imdb_id": "tt0133093", "text": \n')  # malformed line 3
        report = ingest_file(ws, path, skip_bad=True)
        assert ws.count("reviews") == 1
        text = "\n".join(report.lines())
        assert "line 3" in text and "tt9999999" in text


def test_malformed_line_names_file_and_line(tmp_path):
    with _fresh(tmp_path) as ws:
        path = tmp_path / "broken.jsonl"
        _write_reviews(path, [_review("r1", "tt0133093")])
        with path.open("a") as fh:
            fh.write("{not json}\n")
        with pytest.raises(InputError) as info:
            ingest_file(ws, path)
        assert "broken.jsonl" in str(info.value) and "line 2" in str(info.value)
        assert ws.count("reviews") == 0


def test_duplicate_review_ids_against_the_workspace_are_refused(tmp_path):
    with _fresh(tmp_path) as ws:
        path = _write_reviews(tmp_path / "mine.jsonl", [_review("r1", "tt0133093")])
        ingest_file(ws, path)
        with pytest.raises(InputError, match="already exist"):
            ingest_file(ws, path)
        assert ws.count("reviews") == 1


def test_amazon_2023_items_then_reviews(tmp_path):
    with _fresh(tmp_path) as ws:
        items_before = ws.count("items")
        report = ingest_file(ws, FIXTURES / "amazon2023/meta_Movies_and_TV_sample.jsonl", "items")
        assert report.counts["items_added"] > 0
        assert ws.count("items") == items_before + report.counts["items_added"]
        report = ingest_file(ws, FIXTURES / "amazon2023/Movies_and_TV_sample.jsonl", "reviews", skip_bad=True)
        assert report.counts["reviews_added"] > 0
        assert ws.scalar("SELECT count(*) FROM reviews WHERE item_id LIKE 'amazon%'") == report.counts["reviews_added"]


def test_file_that_is_not_what_it_says(tmp_path):
    with _fresh(tmp_path) as ws:
        fake = tmp_path / "reviews.jsonl.gz"
        fake.write_text("userId,movieId,rating,timestamp\n1,2,3.0,4\n")
        with pytest.raises(InputError):
            ingest_file(ws, fake, "reviews")
        assert ws.count("reviews") == 0


def test_bundled_reviews_archive_is_real_gzip():
    with gzip.open(BUNDLED / "imdb_reviews/imdb_reviews_catalog.jsonl.gz", "rt") as fh:
        first = json.loads(fh.readline())
    assert first["imdb_id"].startswith("tt") and first["text"]


def test_kept_and_skipped_counts_agree_after_every_check(tmp_path):
    """The report said "kept 2 ... skipped 0" and then, in a note, that a row was skipped."""
    with _fresh(tmp_path) as ws:
        path = tmp_path / "mine.jsonl"
        _write_reviews(path, [_review("r1", "tt0133093"), _review("r2", "tt9999999"), _review("r4", "tt0088247")])
        with path.open("a") as fh:
            fh.write('{"review_id": "r3", "imdb_id": "tt0133093", "text": \n')  # malformed line 4
        report = ingest_file(ws, path, skip_bad=True)
        assert ws.count("reviews") == 2 and report.counts["reviews_added"] == 2
        summary = [line for line in report.lines() if "kept" in line]
        assert len(summary) == 1 and "kept 2 reviews rows, skipped 2" in summary[0]
        assert "line 4" in summary[0] and "1 rows refer to items not in the catalog" in summary[0]
        assert not any("skipped" in line for line in report.lines() if line not in summary)


def test_an_oversized_review_is_refused_with_its_line_and_nothing_is_written(tmp_path):
    with _fresh(tmp_path) as ws:
        path = _write_reviews(tmp_path / "big.jsonl", [_review("r1", "tt0133093"),
                                                        _review("r2", "tt0133093", "x" * 2_000_000)])
        with pytest.raises(InputError, match=r"big.jsonl, line 2: field 'text' has 2,000,000 characters"):
            ingest_file(ws, path)
        assert ws.count("reviews") == 0
        report = ingest_file(ws, path, skip_bad=True)
        assert ws.count("reviews") == 1 and "skipped 1" in "\n".join(report.lines())
