"""Tests for crs_core.datasets: every loader on a real sample, then every kind of bad input.

Reads only tests/fixtures (see tests/fixtures/SOURCE.md); broken files are written to tmp_path.
"""

from __future__ import annotations

import gzip
import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from crs_core import datasets as ds
from crs_core import datasets_io
from crs_core.datasets import (
    EntityIndex, Loaded, LoadReport, clean_review_text, clean_title, detect_format, entity_title,
    invert_entity2id, load, load_dialogues, load_interactions, load_items, load_movielens_links,
    load_reviews, load_tags, title_year,
)
from crs_core.errors import InputError

FIX = Path(__file__).parent / "fixtures"

AMAZON23_REVIEWS = FIX / "amazon2023/Movies_and_TV_sample.jsonl"
AMAZON23_META = FIX / "amazon2023/meta_Movies_and_TV_sample.jsonl"
AMAZON14 = FIX / "amazon_legacy/Movies_and_TV_5_2014_head10.json"
AMAZON18 = FIX / "amazon_legacy/Movies_and_TV_5_2018_sample12.json"
IMDB = FIX / "imdb/imdb_reviews_sample.jsonl.gz"
ML = FIX / "movielens"
REDIAL_RAW = FIX / "redial/original/test_data_sample.jsonl"
REDIAL_MOVIES = FIX / "redial/original/movies_with_mentions_head.csv"
REDIAL_LLMS = FIX / "redial/llms_zero_shot/test_head.jsonl"
REDIAL_IEVALM = FIX / "redial/ievalm/test_data_processed_head.jsonl"
REDIAL_UNICRS = FIX / "redial/unicrs_processed/test_data_processed_head.jsonl"
INSPIRED_TSV = FIX / "inspired/original/test_sample2.tsv"
INSPIRED_DBPEDIA = FIX / "inspired/unicrs_dbpedia/test_data_dbpedia_head2.jsonl"
INSPIRED_UNICRS = FIX / "inspired/unicrs_processed/test_data_processed_head.jsonl"
INSPIRED_LLMS_RAW = FIX / "inspired/llms_zero_shot/test_raw_head.jsonl"
INSPIRED_CFCRS = FIX / "inspired/cfcrs/test_data_head1.jsonl"
REDIAL_ID2INFO = FIX / "movie_catalog/redial_id2info_sample.json"
INSPIRED_ID2INFO = FIX / "movie_catalog/inspired_id2info_head5.json"
REDIAL_ML_MAP = FIX / "movie_catalog/redial_movielens_movies_data_sample.csv"


def copy_to(tmp_path: Path, src: Path, name: str | None = None) -> Path:
    dest = tmp_path / (name or src.name)
    shutil.copyfile(src, dest)
    return dest


def write(tmp_path: Path, name: str, data: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def text_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


# ============================================================================================
# Format detection
# ============================================================================================

@pytest.mark.parametrize("path, fmt", [
    (AMAZON23_REVIEWS, "amazon2023_reviews"),
    (AMAZON23_META, "amazon2023_meta"),
    (AMAZON14, "amazon_legacy_reviews"),
    (AMAZON18, "amazon_legacy_reviews"),
    (IMDB, "imdb_reviews"),
    (ML / "movies.csv", "movielens_movies"),
    (ML / "ratings.csv", "movielens_ratings"),
    (ML / "tags.csv", "movielens_tags"),
    (ML / "links.csv", "movielens_links"),
    (REDIAL_RAW, "redial_raw"),
    (REDIAL_MOVIES, "redial_movies_with_mentions"),
    (REDIAL_LLMS, "crs_processed"),
    (REDIAL_IEVALM, "crs_processed"),
    (REDIAL_UNICRS, "crs_processed"),
    (INSPIRED_TSV, "inspired_tsv"),
    (INSPIRED_DBPEDIA, "unicrs_dbpedia"),
    (INSPIRED_UNICRS, "crs_processed"),
    (INSPIRED_LLMS_RAW, "crs_processed"),
    (INSPIRED_CFCRS, "cfcrs_dialogs"),
    (REDIAL_ID2INFO, "redial_id2info"),
    (INSPIRED_ID2INFO, "inspired_id2info"),
    (REDIAL_ML_MAP, "redial_movielens_map"),
    (FIX / "redial/llms_zero_shot/entity2id.json", "entity2id"),
    (FIX / "redial/llms_zero_shot/item_ids.json", "item_ids"),
])
def test_detect_format_on_every_fixture(path, fmt):
    assert detect_format(path) == fmt


def test_detect_format_reads_content_not_extension(tmp_path):
    assert detect_format(copy_to(tmp_path, ML / "ratings.csv", "ratings.jsonl")) == "movielens_ratings"
    assert detect_format(copy_to(tmp_path, IMDB, "reviews.dat")) == "imdb_reviews"  # gzip, no .gz
    plain = write(tmp_path, "catalog.txt", json.dumps(
        json.loads(REDIAL_ID2INFO.read_text()), indent=2))   # pretty-printed catalog
    assert detect_format(plain) == "redial_id2info"
    assert len(load_items(plain).data) == 25


def test_detect_format_unknown_and_binary(tmp_path):
    with pytest.raises(InputError, match="unrecognised format"):
        detect_format(write(tmp_path, "notes.csv", "a,b,c\n1,2,3\n"))
    with pytest.raises(InputError, match="NUL bytes"):
        detect_format(write(tmp_path, "image.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"))


# ============================================================================================
# Reviews
# ============================================================================================

def test_amazon2023_reviews(tmp_path):
    df, report = load_reviews(AMAZON23_REVIEWS)
    assert list(df.columns) == list(ds.REVIEW_COLUMNS)
    assert len(df) == 5 and report.kept == 5 and report.skipped == 0
    first = df.iloc[0]
    assert first.item_key == "B00FIXT000"                     # parent_asin, joins the meta file
    assert first.extra["asin"] == "B00FIXT001"
    assert first.timestamp == 1588615855                      # ms -> s
    assert first.text == ("Watched this again with my kids and it is still as funny as I "
                          "remember.\n\nThe transfer looks great on a big TV.")
    assert df.review_id.is_unique
    assert "<i>Season two</i>" in df.text.iloc[4]             # other HTML is left alone
    assert set(df.source) == {"amazon_2023"}
    assert str(df.timestamp.dtype) == "Int64" and df.rating.dtype == "float64"


def test_amazon2023_meta():
    df, _ = load_items(AMAZON23_META)
    assert list(df.columns) == list(ds.ITEM_COLUMNS)
    dvd, prime, show = (df.iloc[i] for i in range(3))
    assert dvd.item_key == "B00FIXT000" and dvd.year == 2002            # "Release date"
    assert dvd.directors == ["Pat Placeholder"]
    assert dvd.cast == ["Jane Example", "John Sample", "Ann Fixture"]   # "Actors" string
    assert dvd.genres == ["Comedy"]                                      # category path cleaned
    plot = dvd["plot"]                                       # (row.plot is pandas' plot accessor)
    assert plot.startswith("A small-town family mix-up") and "Product Description" not in plot
    assert prime.year == 2021 and prime.directors == ["Sam Example"]     # features / lists
    assert prime.cast == ["Lee Fixture", "Morgan Sample"]
    assert show.directors == [] and show["plot"] == "" and show.year == 2019   # details: null
    assert dvd.source_ids == {"amazon": "B00FIXT000"} and dvd.imdb_id is None


def test_amazon_2014_reviews():
    df, _ = load_reviews(AMAZON14)
    assert len(df) == 10 and set(df.source) == {"amazon_2014"}
    first = df.iloc[0]
    assert (first.user_id, first.item_key, first.rating, first.timestamp) == (
        "ADZPIG9QOCDG5", "0005019281", 4.0, 1203984000)
    assert first.text.startswith("This is a charming version of the classic Dicken's tale.")
    assert first.extra["summary"] == "good version of a classic"
    assert first.extra["helpful_votes"] == 0


def test_amazon_2018_reviews_same_user_same_item_twice():
    df, _ = load_reviews(AMAZON18)
    assert len(df) == 12 and set(df.source) == {"amazon_2018"}
    assert df.iloc[0].extra["helpful_votes"] == 7 and df.iloc[0].extra["verified"] is True
    twice = df[(df.user_id == "A23KZBVCFKW1XS") & (df.item_key == "0767020294")]
    assert len(twice) == 2 and twice.review_id.is_unique      # two real, distinct reviews


def test_imdb_reviews_gzip_and_html_breaks():
    df, report = load_reviews(IMDB)
    assert len(df) == 9 and report.fmt == "imdb_reviews"
    assert df.review_id.tolist()[:2] == ["train_pos_0", "train_pos_1"]
    assert df.item_key.str.fullmatch(r"tt\d{7}").all()
    assert df.user_id.isna().all() and df.timestamp.isna().all()
    assert not df.text.str.contains("<br", regex=False).any()
    assert df.text.str.contains("\n\n", regex=False).sum() >= 2
    assert df.iloc[0].rating == 9.0 and df.iloc[0].extra == {
        "split": "train", "label": "pos", "file": "train/pos/0_9.txt"}


def test_clean_review_text_only_touches_line_breaks():
    text = 'A<br />B<br/>C<BR>D <b>bold</b> &amp; <a href="x">link</a>'
    assert clean_review_text(text) == 'A\nB\nC\nD <b>bold</b> &amp; <a href="x">link</a>'


# ============================================================================================
# Items
# ============================================================================================

def test_movielens_movies_joins_links_next_to_it():
    df, report = load_items(ML / "movies.csv")
    assert len(df) == 21 and any("links.csv" in note for note in report.notes)
    toy = df.iloc[0]
    assert (toy.item_key, toy.title, toy.year, toy.imdb_id) == ("1", "Toy Story (1995)", 1995,
                                                                "tt0114709")
    assert toy.genres == ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]
    assert toy.source_ids == {"movielens": "1", "imdb": "tt0114709", "tmdb": "862"}
    assert df.set_index("item_key").loc["11", "title"] == "American President, The (1995)"
    assert df.set_index("item_key").loc["83829", "genres"] == []      # (no genres listed)


def test_movielens_movies_without_links(tmp_path):
    df, report = load_items(copy_to(tmp_path, ML / "movies.csv"))
    assert df.imdb_id.isna().all() and report.notes == []
    df, _ = load_items(tmp_path / "movies.csv", links=ML / "links.csv")
    assert df.iloc[0].imdb_id == "tt0114709"


def test_movielens_links():
    df, _ = load_movielens_links(ML / "links.csv")
    assert list(df.columns) == ["item_key", "imdb_id", "tmdb_id"]
    assert df.iloc[0].tolist() == ["1", "tt0114709", "862"]


def test_redial_id2info_catalog():
    df, _ = load_items(REDIAL_ID2INFO)
    assert len(df) == 25 and set(df.source) == {"redial"}
    pari = df.set_index("item_key").loc["100026"]
    assert (pari.title, pari.year, pari.imdb_id) == ("Pari (1995)", 1995, "tt0114092")
    assert pari.cast == ["Niki Karimi", "Khosro Shakibai", "Ali Mosaffa"]
    assert pari.directors == ["Dariush Mehrjui"] and pari.genres == ["drama", "romance"]
    assert pari.extra == {"writers": ["J.D. Salinger", "Dariush Mehrjui"]}
    assert pari.source_ids == {"redial": "100026", "imdb": "tt0114092"}
    back = df.set_index("item_key").loc["100043"]            # no year in this catalog title
    assert back.title == "Back to the Future" and pd.isna(back.year)


def test_inspired_id2info_catalog():
    df, _ = load_items(INSPIRED_ID2INFO)
    assert len(df) == 5 and set(df.source) == {"inspired"}
    antlers = df.iloc[0]
    assert (antlers.item_key, antlers.title, antlers.year) == ("0", "Antlers (2020)", 2020)
    assert antlers.imdb_id is None and antlers.directors == ["Scott Cooper"]


def test_redial_movies_with_mentions():
    df, _ = load_items(REDIAL_MOVIES)
    assert len(df) == 14
    first = df.iloc[0]
    assert (first.item_key, first.title, first.year) == ("75796", "Headhunter (2009)", 2009)
    assert first.extra == {"n_mentions": 1}


def test_redial_movielens_map_real_quirks():
    with pytest.raises(InputError) as err:        # line 14 repeats line 2 (real data)
        load_items(REDIAL_ML_MAP)
    assert err.value.line == 14 and "duplicate item_key '144711'" in str(err.value)
    df, report = load_items(REDIAL_ML_MAP, skip_bad=True)
    assert len(df) == 12 and report.skipped == 2
    assert [line for line, _ in report.problems] == [14, 15]
    assert "no ReDial id" in report.problems[1][1]
    omen = df.iloc[0]
    assert (omen.item_key, omen.title, omen.year, omen.imdb_id) == (
        "144711", "The Omen (2006)", 2006, "tt0466909")
    assert omen.cast == ["Liev Schreiber", "Julia Stiles", "Seamus Davey-Fitzpatrick"]
    assert omen.source_ids == {"redial": "144711", "imdb": "tt0466909", "movielens": "45662"}
    assert df.set_index("item_key").loc["152496", "year"] == 1989    # title wins over column


# ============================================================================================
# Interactions and tags
# ============================================================================================

def test_movielens_ratings():
    df, _ = load_interactions(ML / "ratings.csv")
    assert list(df.columns) == list(ds.INTERACTION_COLUMNS) and len(df) == 20
    assert df.iloc[0].tolist() == ["1", "31", 2.5, 1260759144, "movielens"]


def test_movielens_tags_with_quoted_quotes():
    df, _ = load_tags(ML / "tags.csv")
    assert list(df.columns) == list(ds.TAG_COLUMNS) and len(df) == 11
    assert df.iloc[0].tag == "sandra 'boring' bullock"
    assert df.iloc[-1].tag == 'The Rocks "finest" work need I say more?'


# ============================================================================================
# Dialogues
# ============================================================================================

def turns_of(df: pd.DataFrame, dialog_id: str) -> pd.DataFrame:
    return df[df.dialog_id == dialog_id].reset_index(drop=True)


def test_redial_raw_turns():
    df, report = load_dialogues(REDIAL_RAW)
    assert list(df.columns) == list(ds.TURN_COLUMNS)
    assert df.dialog_id.unique().tolist() == ["20001", "20041", "20131"]   # 20131: questions []
    d = turns_of(df, "20001")
    assert d.turn_id.tolist() == ["204172", "204175", "204177", "204179", "204181", "204184"]
    first = d.iloc[0]
    assert first.context == ["Hi I am looking for a movie like Super Troopers (2001)"]
    assert first.resp == "You should watch Police Academy (1984)"       # @151656 replaced
    assert (first.rec, first.rec_titles, first.mentioned) == (
        ["151656"], ["Police Academy (1984)"], ["111776"])
    assert first.ref_kind == "redial_id" and first.speaker == "recommender"
    assert first.extra["feedback"]["151656"]["initiator"] == {"suggested": 1, "seen": 0, "liked": 1}
    # "Yes @151656 ... and so is @94688": only the movie not mentioned before is recommended
    assert d.iloc[1].rec == ["94688"] and "151656" in d.iloc[1].mentioned
    # consecutive seeker messages are one context utterance
    assert d.iloc[1].context[-1] == ("Is that a great one? I have never seen it. I have seen "
                                     "American Pie I mean American Pie (1999)")
    assert d.iloc[2].rec == []                                           # chit-chat turn
    assert d.iloc[5].resp == "you are welcome and also 48 Hrs. (1982)"   # merged 204183+204184
    assert not df.resp.str.contains("@").any()
    assert not any("@" in u for ctx in df.context for u in ctx)


def test_redial_llms_zero_shot_ids_resolved_from_sibling_entity2id():
    df, report = load_dialogues(REDIAL_LLMS)
    assert any("entity2id.json" in note for note in report.notes)
    first = df.iloc[0]
    assert (first.dialog_id, first.turn_id, first.speaker) == ("test_20001", "204172", "recommender")
    assert first.context == ["Hi I am looking for a movie like Super Troopers (2001)"]   # "" dropped
    assert (first.rec, first.rec_titles, first.ref_kind) == (["29891"], ["Police Academy"], "entity_id")
    assert first.mentioned_titles == ["Super Troopers"]
    # prev_entity of the second turn also holds dbpedia "Israel" (not a movie): filtered out
    assert df.iloc[1].mentioned_titles == ["Super Troopers", "Police Academy", "American Pie"]


def test_redial_ievalm_titles_inline():
    df, report = load_dialogues(REDIAL_IEVALM)
    assert len(df) == 5 and set(df.ref_kind) == {"title"}
    second = df.iloc[1]
    assert second.rec == ["Police Academy (1984)", "Police Academy 2: Their First Assignment (1985)"]
    assert second.rec_titles == second.rec
    # the file's entity list also has "Eve" and "American Pie" (no year): kept out
    assert second.mentioned == ["Super Troopers (2001)", "Police Academy (1984)", "American Pie (1999)"]
    assert any("ends in a year" in note for note in report.notes)


def test_redial_unicrs_processed_infers_dialogues():
    df, report = load_dialogues(REDIAL_UNICRS)
    assert df.groupby("dialog_id", sort=False).size().tolist() == [6, 9, 4, 1]
    assert df.dialog_id.iloc[0] == "test_0" and df.turn_id.tolist()[:3] == ["0", "1", "2"]
    assert df.iloc[0].rec_titles == ["Police Academy"] and df.iloc[0].resp == "You should watch <movie>"
    assert any("inferred" in note for note in report.notes)


def test_inspired_tsv_merges_sentences_into_utterances():
    df, _ = load_dialogues(INSPIRED_TSV)
    assert df.dialog_id.unique().tolist() == ["20191127-224739_530_live.pkl",
                                              "20200219-232618_978_live.pkl"]
    d = turns_of(df, "20191127-224739_530_live.pkl")
    assert d.iloc[0].resp == "Hi! I'm here to help you chose a movie!"    # rows 1+2 merged
    assert d.iloc[0].extra == {"strategies": ["no_strategy", "offer_help"]}
    assert d.iloc[2].resp.startswith('How did you like "Hustlers"?')     # QUOTATION_MARK
    assert d.iloc[2].mentioned == ["Hustlers (2019)"] and d.iloc[2].rec == []
    assert d.iloc[4].rec == ["Deadpool (2016)"] and d.iloc[4].ref_kind == "title"
    assert d.iloc[2].context[1] == "Terrific"


def test_inspired_unicrs_dbpedia_and_cfcrs_agree():
    dbp, _ = load_dialogues(INSPIRED_DBPEDIA)
    cf, _ = load_dialogues(INSPIRED_CFCRS)
    assert dbp.dialog_id.unique().tolist() == ["test_0", "test_1"]
    assert cf.dialog_id.unique().tolist() == ["20191127-224739_530_live.pkl"]
    first = turns_of(dbp, "test_0")
    assert first.rec.tolist() == cf.rec.tolist()
    assert first.iloc[4].rec == ["Deadpool (2016)"]


def test_inspired_processed_files():
    raw, _ = load_dialogues(INSPIRED_LLMS_RAW)
    assert raw.speaker.tolist()[:4] == ["recommender", "seeker", "recommender", "seeker"]
    assert raw.iloc[3].rec_titles == ["Hustlers"]
    assert raw.iloc[4].mentioned_titles == ["Hustlers"]
    uni, _ = load_dialogues(INSPIRED_UNICRS)
    assert uni.groupby("dialog_id", sort=False).size().tolist() == [10, 2]
    assert uni.iloc[2].rec_titles == ["Hustlers"]


def test_entities_can_be_given_explicitly(tmp_path):
    lonely = copy_to(tmp_path, REDIAL_LLMS)                 # no entity2id.json next to it
    df, report = load_dialogues(lonely)
    assert df.iloc[0].rec_titles == [None] and any("no entity2id" in n for n in report.notes)
    df, _ = load_dialogues(lonely, entities=FIX / "redial/llms_zero_shot/entity2id.json")
    assert df.iloc[0].rec_titles == ["Police Academy"]


# ============================================================================================
# Helpers
# ============================================================================================

@pytest.mark.parametrize("uri, title", [
    ("<http://dbpedia.org/resource/Super_Troopers>", "Super Troopers"),
    ("<http://dbpedia.org/resource/Police_Academy_(film)>", "Police Academy"),
    ("<http://dbpedia.org/resource/Water_(1985_film)>", "Water (1985)"),
    ("<http://dbpedia.org/resource/Shall_We_Dance%3F_(1996_film)>", "Shall We Dance? (1996)"),
    ("<http://dbpedia.org/resource/Documentary_film>", "Documentary film"),
    ("Police Academy  (1984)", "Police Academy (1984)"),
])
def test_entity_title(uri, title):
    assert entity_title(uri) == title


def test_invert_entity2id_and_index(tmp_path):
    inverse = invert_entity2id(FIX / "redial/llms_zero_shot/entity2id.json")
    assert inverse[29891] == "<http://dbpedia.org/resource/Police_Academy_(film)>"
    with pytest.raises(InputError, match="used by both"):
        invert_entity2id({"<a>": 1, "<b>": 1})
    index = EntityIndex.next_to(REDIAL_LLMS)
    assert index.title(29891) == "Police Academy" and index.is_movie(29891) is True
    assert EntityIndex.next_to(tmp_path / "x.jsonl") is None


def test_title_helpers():
    assert clean_title("The Omen(2006)") == "The Omen (2006)"
    assert clean_title("  American Pie  (1999) ") == "American Pie (1999)"
    assert title_year("Heat (1995)") == 1995 and title_year("Kill Bill") is None


def test_load_generic_and_result_shape():
    result = load(ML / "ratings.csv")
    assert isinstance(result, Loaded) and isinstance(result.report, LoadReport)
    df, report = result                                    # unpacks
    assert report.kind == "interactions" and report.fmt == "movielens_ratings"
    assert "kept 20" in report.summary()
    df2, _ = load_reviews(AMAZON14, source="my_amazon")
    assert set(df2.source) == {"my_amazon"}


def test_loaders_write_nothing(tmp_path):
    for src in (IMDB, REDIAL_LLMS, FIX / "redial/llms_zero_shot/entity2id.json",
                FIX / "redial/llms_zero_shot/item_ids.json", ML / "movies.csv", ML / "links.csv"):
        copy_to(tmp_path, src)
    before = sorted(p.name for p in tmp_path.iterdir())
    load_reviews(tmp_path / IMDB.name)
    load_dialogues(tmp_path / REDIAL_LLMS.name)
    load_items(tmp_path / "movies.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ============================================================================================
# Bad input
# ============================================================================================

def test_malformed_json_line(tmp_path):
    lines = text_lines(AMAZON14)
    lines[3] = lines[3][:50] + "}}"
    path = write(tmp_path, "bad.json", "\n".join(lines) + "\n")
    with pytest.raises(InputError) as err:
        load_reviews(path)
    assert err.value.line == 4 and err.value.path == str(path)
    assert "malformed JSON" in str(err.value) and str(path) in str(err.value)
    df, report = load_reviews(path, skip_bad=True)
    assert len(df) == 9 and report.skipped == 1 and report.problems[0][0] == 4


def test_missing_field(tmp_path):
    lines = text_lines(AMAZON23_REVIEWS)
    record = json.loads(lines[1])
    del record["parent_asin"]
    lines[1] = json.dumps(record)
    path = write(tmp_path, "reviews.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"line 2: missing field 'parent_asin'"):
        load_reviews(path)
    df, report = load_reviews(path, skip_bad=True)
    assert len(df) == 4 and report.problems == [(2, "missing field 'parent_asin'")]


def test_wrong_field_values(tmp_path):
    with gzip.open(IMDB, "rt", encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh]
    records[0]["rating"] = "ten"
    records[1]["imdb_id"] = "0453418x"
    records[2]["rating"] = 42
    records[3] = ["not", "an", "object"]
    path = write(tmp_path, "imdb.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(InputError, match="line 1: field 'rating' is not a number: 'ten'"):
        load_reviews(path)
    df, report = load_reviews(path, skip_bad=True)
    assert len(df) == 5
    reasons = dict(report.problems)
    assert "not an IMDb id" in reasons[2] and "outside 1..10" in reasons[3]
    assert "expected a JSON object, found list" in reasons[4]


def test_wrong_or_missing_csv_columns(tmp_path):
    path = write(tmp_path, "ratings.csv", "userId,movieId,stars,timestamp\n1,31,2.5,1260759144\n")
    with pytest.raises(InputError, match="unrecognised format"):
        load_interactions(path)                           # sniffing finds no known header
    with pytest.raises(InputError, match=r"line 1: missing column\(s\) rating"):
        load_interactions(path, fmt="movielens_ratings")
    with pytest.raises(InputError, match=r"missing column\(s\) rating"):   # even when skipping
        load_interactions(path, fmt="movielens_ratings", skip_bad=True)


def test_csv_row_with_wrong_field_count(tmp_path):
    lines = text_lines(ML / "ratings.csv")
    lines[5] = "1,1293"
    path = write(tmp_path, "ratings.csv", "\n".join(lines) + "\n")
    with pytest.raises(InputError, match="line 6: expected 4 fields, found 2"):
        load_interactions(path)
    df, report = load_interactions(path, skip_bad=True)
    assert len(df) == 19 and report.problems[0][0] == 6


def test_tsv_row_with_unknown_speaker(tmp_path):
    lines = text_lines(INSPIRED_TSV)
    cells = lines[3].split("\t")
    cells[2] = "NARRATOR"
    lines[3] = "\t".join(cells)
    path = write(tmp_path, "test.tsv", "\n".join(lines) + "\n")
    with pytest.raises(InputError, match="line 4: unknown speaker role 'NARRATOR'"):
        load_dialogues(path)
    df, report = load_dialogues(path, skip_bad=True)
    # without the seeker's "Terrific" the two first recommender utterances become one turn
    assert report.skipped == 1 and len(df) == 19
    assert df.iloc[0].resp.startswith("Hi! I'm here to help you chose a movie! What are")


def test_non_utf8_bytes(tmp_path):
    data = REDIAL_MOVIES.read_bytes().replace(b"Headhunter", b"Headh\xe9nter")   # latin-1 byte
    path = write(tmp_path, "movies.csv", data)
    with pytest.raises(InputError, match=r"line 2: not valid UTF-8 \(byte 0xe9"):
        load_items(path)
    df, report = load_items(path, skip_bad=True)
    assert len(df) == 13 and report.problems[0][0] == 2
    jsonl = AMAZON14.read_bytes().split(b"\n")
    jsonl[2] = jsonl[2][:40] + b"\xff\xfe" + jsonl[2][40:]
    path = write(tmp_path, "reviews.json", b"\n".join(jsonl))
    with pytest.raises(InputError, match="line 3: not valid UTF-8"):
        load_reviews(path)
    with pytest.raises(InputError, match="not valid UTF-8"):
        load_items(write(tmp_path, "cat.json", REDIAL_ID2INFO.read_bytes().replace(b"Pari", b"P\xe4ri")))


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_files(tmp_path, content):
    path = write(tmp_path, "empty.jsonl", content)
    with pytest.raises(InputError, match="empty"):
        detect_format(path)
    with pytest.raises(InputError, match="empty"):
        load_reviews(path, fmt="imdb_reviews", skip_bad=True)


def test_header_only_csv_and_empty_catalog(tmp_path):
    with pytest.raises(InputError, match="header but no data rows"):
        load_interactions(write(tmp_path, "ratings.csv", "userId,movieId,rating,timestamp\n"))
    with pytest.raises(InputError, match="no entries"):
        load_items(write(tmp_path, "id2info.json", "{}"), fmt="redial_id2info")


def test_file_that_is_not_what_its_extension_says(tmp_path):
    csv_named_jsonl = copy_to(tmp_path, ML / "ratings.csv", "reviews.jsonl")
    with pytest.raises(InputError, match=r"looks like MovieLens ratings.csv \(interactions\), not reviews"):
        load_reviews(csv_named_jsonl)
    with pytest.raises(InputError, match="line 1: not a JSON line"):
        load_reviews(csv_named_jsonl, fmt="imdb_reviews")
    plain_named_gz = copy_to(tmp_path, AMAZON14, "reviews.json.gz")
    with pytest.raises(InputError, match="named .gz but is not gzip-compressed"):
        load_reviews(plain_named_gz)
    gzip_named_jsonl = copy_to(tmp_path, IMDB, "imdb.jsonl")      # gzip content is fine
    assert len(load_reviews(gzip_named_jsonl).data) == 9


def test_truncated_gzip(tmp_path):
    data = IMDB.read_bytes()
    path = write(tmp_path, "cut.jsonl.gz", data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or corrupt") as err:
        load_reviews(path)
    assert err.value.line is not None
    df, report = load_reviews(path, skip_bad=True)
    assert 0 < len(df) < 9 and report.skipped == 1
    assert "truncated" in report.problems[0][1]


def test_truncated_last_line(tmp_path):
    data = REDIAL_RAW.read_bytes().rstrip(b"\n")
    path = write(tmp_path, "dialogues.jsonl", data[: len(data) - 200])   # no final newline
    with pytest.raises(InputError, match="line 3: last line is incomplete.*truncated"):
        load_dialogues(path)
    df, report = load_dialogues(path, skip_bad=True)
    assert df.dialog_id.unique().tolist() == ["20001", "20041"] and report.skipped == 1


def test_truncated_json_document(tmp_path):
    data = REDIAL_ID2INFO.read_bytes()
    path = write(tmp_path, "id2info.json", data[:-500])
    with pytest.raises(InputError, match="malformed or truncated JSON") as err:
        load_items(path, fmt="redial_id2info", skip_bad=True)      # cannot skip inside a document
    assert err.value.line == 1


def test_duplicate_ids(tmp_path):
    lines = text_lines(AMAZON14)
    path = write(tmp_path, "dup.json", "\n".join(lines + [lines[0]]) + "\n")
    with pytest.raises(InputError, match=r"line 11: duplicate review_id .*\(first on line 1\)"):
        load_reviews(path)
    df, report = load_reviews(path, skip_bad=True)
    assert len(df) == 10 and report.skipped == 1

    dialogues = text_lines(REDIAL_RAW)
    path = write(tmp_path, "dup_dialogues.jsonl", "\n".join(dialogues + [dialogues[0]]) + "\n")
    with pytest.raises(InputError, match="line 4: duplicate dialog_id/turn_id"):
        load_dialogues(path)

    catalog = REDIAL_ID2INFO.read_text()
    entry = catalog[1:catalog.index(', "100030"')]                # '"100026": {...}'
    path = write(tmp_path, "id2info.json", "{" + entry + ", " + catalog[1:])
    with pytest.raises(InputError, match="duplicate item_key '100026'"):
        load_items(path)
    assert len(load_items(path, skip_bad=True).data) == 25


def test_bad_dialogue_is_skipped_whole(tmp_path):
    dialogues = [json.loads(line) for line in text_lines(REDIAL_RAW)]
    dialogues[1]["messages"][3]["senderWorkerId"] = 12345
    path = write(tmp_path, "d.jsonl", "".join(json.dumps(d) + "\n" for d in dialogues))
    with pytest.raises(InputError, match=r"line 2: dialogue 20041, message 4: sender 12345"):
        load_dialogues(path)
    df, report = load_dialogues(path, skip_bad=True)
    assert "20041" not in set(df.dialog_id) and report.skipped == 1


def test_processed_turns_bad_fields(tmp_path):
    turns = [json.loads(line) for line in text_lines(REDIAL_IEVALM)]
    turns[1]["context"] = "not a list"
    turns[2]["rec"] = ["Heat (1995)", 42]
    path = write(tmp_path, "p.jsonl", "".join(json.dumps(t) + "\n" for t in turns))
    df, report = load_dialogues(path, skip_bad=True)
    assert len(df) == 3 and [line for line, _ in report.problems] == [2, 3]
    assert "mixes ids and titles" in report.problems[1][1]


def test_html_in_text_is_kept_except_line_breaks(tmp_path):
    record = {"review_id": "r1", "imdb_id": "tt0114709",
              "text": "Great<br /><br />movie. <script>alert(1)</script> <i>Really</i> &lt;3",
              "rating": 10}
    path = write(tmp_path, "r.jsonl", json.dumps(record) + "\n")
    text = load_reviews(path).data.text.iloc[0]
    assert text == "Great\n\nmovie. <script>alert(1)</script> <i>Really</i> &lt;3"


def test_unknown_format_name_and_missing_file(tmp_path):
    with pytest.raises(InputError, match="unknown format 'csv'"):
        load_reviews(AMAZON14, fmt="csv")
    with pytest.raises(InputError, match="file not found"):
        load_reviews(tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match="entity2id.json .* not data"):
        load_dialogues(FIX / "redial/llms_zero_shot/entity2id.json")


def test_skip_report_is_capped_but_counts_everything(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets_io, "MAX_PROBLEMS", 2)  # where the report keeps them
    path = write(tmp_path, "r.jsonl", "{oops\n" * 5 + text_lines(AMAZON14)[0] + "\n")
    df, report = load_reviews(path, fmt="amazon_legacy_reviews", skip_bad=True)
    assert len(df) == 1 and report.skipped == 5 and len(report.problems) == 2
    assert not math.isnan(df.rating.iloc[0])


# -- issue 13, finding 6: input edges -------------------------------------------------------------
def test_a_record_whose_text_is_too_long_is_refused_with_its_line(tmp_path, monkeypatch):
    path = tmp_path / "reviews.jsonl"
    rows = [{"review_id": f"r{i}", "imdb_id": "tt0133093", "text": "Fine film. " * (3 if i != 2 else 20_000)}
            for i in range(1, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputError) as info:
        load_reviews(path)
    assert "line 2" in str(info.value) and "220,000 characters" in str(info.value)
    assert f"{ds.MAX_TEXT_CHARS:,}" in str(info.value)
    df, rep = load_reviews(path, skip_bad=True)
    assert list(df["review_id"]) == ["r1", "r3"] and rep.skipped == 1 and rep.problems[0][0] == 2


def test_reviews_whose_first_value_is_an_integer_are_not_an_entity2id_file(tmp_path):
    """A JSON lines file of records in an unknown shape was taken for entity2id.json."""
    path = tmp_path / "my_reviews.jsonl"
    path.write_text('{"stars": 5, "movie": "tt0133093", "text": "Great"}\n'
                    '{"stars": 2, "movie": "tt0088247", "text": "Meh"}\n')
    with pytest.raises(InputError) as info:
        load(path, kind="reviews")
    message = str(info.value)
    assert "entity2id" not in message and "unrecognised format" in message
    assert "known reviews formats: Amazon Reviews 2023 JSONL" in message and "IMDb review JSONL" in message
    entity2id = tmp_path / "entity2id.json"  # a real one (one line, every value an id) is still recognised
    entity2id.write_text('{"<http://dbpedia.org/resource/Heat_(1995_film)>": 0, "<http://dbpedia.org/resource/Alien>": 1}')
    assert detect_format(entity2id) == "entity2id"
    with pytest.raises(InputError, match="entity2id.json .* not data"):
        load(entity2id, kind="reviews")
