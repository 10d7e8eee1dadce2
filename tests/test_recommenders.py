"""Recommenders (popularity, NBCRS, zero-shot dense retrieval) on a small real workspace.

The workspace holds 36 real movies (titles, genres, plots, directors and casts as published
in the ReDial movie metadata of iEvaLM-CRS), a few users' interactions, reviewed synthetic
queries with ranked ground truth, and a handful of dialogue turns. MiniLM runs on the CPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from crs_core.evaluate import evaluate  # noqa: E402
from crs_core.recommenders import (  # noqa: E402
    NBCRS,
    Catalog,
    DenseRetrieval,
    Popularity,
    Recommender,
    RecommenderError,
    TrainingSet,
    context_text,
    default_encoder,
    make_recommender,
    training_set_from_synthetic,
    training_set_from_turns,
)
from crs_core.catalog import item_text  # noqa: E402
from crs_core.store import Workspace  # noqa: E402

# (imdb id, title, year, genres, plot, director, stars)
MOVIES = [
    ('tt0076759', 'Star Wars', 1977, 'action|adventure|fantasy',
     "Luke Skywalker joins forces with a Jedi Knight, a cocky pilot, a Wookiee and two droids to save the galaxy from the Empire's world-destroying battle station, while also attempting to rescue Princess Leia from the mysterious Darth Vader.",
     'George Lucas', 'Mark Hamill|Harrison Ford|Carrie Fisher'),
    ('tt0796366', 'Star Trek', 2009, 'action|adventure|sci-fi',
     "The brash James T. Kirk tries to live up to his father's legacy with Mr. Spock keeping him in check as a vengeful Romulan from the future creates black holes to destroy the Federation one planet at a time.",
     'J.J. Abrams', 'Chris Pine|Zachary Quinto|Zoe Saldana'),
    ('tt0816692', 'Interstellar', 2014, 'adventure|drama|sci-fi',
     "A team of explorers travel through a wormhole in space in an attempt to ensure humanity's survival.",
     'Christopher Nolan', 'Matthew McConaughey|Anne Hathaway|Jessica Chastain'),
    ('tt3659388', 'The Martian', 2015, 'adventure|drama|sci-fi',
     'An astronaut becomes stranded on Mars after his team assume him dead, and must rely on his ingenuity to find a way to signal to Earth that he is alive and can survive until a potential rescue.',
     'Ridley Scott', 'Matt Damon|Jessica Chastain|Kristen Wiig'),
    ('tt0078748', 'Alien', 1979, 'horror|sci-fi',
     'The crew of a commercial spacecraft encounter a deadly lifeform after investigating an unknown transmission.',
     'Ridley Scott', 'Sigourney Weaver|Tom Skerritt|John Hurt'),
    ('tt1454468', 'Gravity', 2013, 'sci-fi|thriller',
     'Two astronauts work together to survive after an accident leaves them stranded in space.',
     'Alfonso Cuarón', 'Sandra Bullock|George Clooney|Ed Harris'),
    ('tt2015381', 'Guardians of the Galaxy', 2014, 'action|adventure|comedy',
     'A group of intergalactic criminals must pull together to stop a fanatical warrior with plans to purge the universe.',
     'James Gunn', 'Chris Pratt|Vin Diesel|Bradley Cooper'),
    ('tt0848228', 'The Avengers', 2012, 'action|adventure|sci-fi',
     "Earth's mightiest heroes must come together and learn to fight as a team if they are going to stop the mischievous Loki and his alien army from enslaving humanity.",
     'Joss Whedon', 'Robert Downey Jr.|Chris Evans|Scarlett Johansson'),
    ('tt0114709', 'Toy Story', 1995, 'animation|adventure|comedy',
     "A cowboy doll is profoundly threatened and jealous when a new spaceman action figure supplants him as top toy in a boy's bedroom.",
     'John Lasseter', 'Tom Hanks|Tim Allen|Don Rickles'),
    ('tt0266543', 'Finding Nemo', 2003, 'animation|adventure|comedy',
     'After his son is captured in the Great Barrier Reef and taken to Sydney, a timid clownfish sets out on a journey to bring him home.',
     'Andrew Stanton', 'Albert Brooks|Ellen DeGeneres|Alexander Gould'),
    ('tt0110357', 'The Lion King', 1994, 'animation|adventure|drama',
     'Lion prince Simba and his father are targeted by his bitter uncle, who wants to ascend the throne himself.',
     'Roger Allers', 'Matthew Broderick|Jeremy Irons|James Earl Jones'),
    ('tt2294629', 'Frozen', 2013, 'animation|adventure|comedy',
     'When the newly crowned Queen Elsa accidentally uses her power to turn things into ice to curse her home in infinite winter, her sister Anna teams up with a mountain man, his playful reindeer, and a snowman to change the weather condition.',
     'Chris Buck', 'Kristen Bell|Idina Menzel|Jonathan Groff'),
    ('tt0126029', 'Shrek', 2001, 'animation|adventure|comedy',
     'A mean lord exiles fairytale creatures to the swamp of a grumpy ogre, who must go on a quest and rescue a princess for the lord in order to get his land back.',
     'Andrew Adamson', 'Mike Myers|Eddie Murphy|Cameron Diaz'),
    ('tt1049413', 'Up', 2009, 'animation|adventure|comedy',
     '78-year-old Carl Fredricksen travels to Paradise Falls in his house equipped with balloons, inadvertently taking a young stowaway.',
     'Pete Docter', 'Edward Asner|Jordan Nagai|John Ratzenberger'),
    ('tt2096673', 'Inside Out', 2015, 'animation|adventure|comedy',
     'After young Riley is uprooted from her Midwest life and moved to San Francisco, her emotions - Joy, Fear, Anger, Disgust and Sadness - conflict on how best to navigate a new city, house, and school.',
     'Pete Docter', 'Amy Poehler|Bill Hader|Lewis Black'),
    ('tt0332280', 'The Notebook', 2004, 'drama|romance',
     'A poor yet passionate young man (Ryan Gosling) falls in love with a rich young woman (Rachel McAdams), giving her a sense of freedom, but they are soon separated because of their social differences.',
     'Nick Cassavetes', 'Gena Rowlands|James Garner|Rachel McAdams'),
    ('tt0120338', 'Titanic', 1997, 'drama|romance',
     'A seventeen-year-old aristocrat falls in love with a kind but poor artist aboard the luxurious, ill-fated R.M.S. Titanic.',
     'James Cameron', 'Leonardo DiCaprio|Kate Winslet|Billy Zane'),
    ('tt0414387', 'Pride & Prejudice', 2005, 'drama|romance',
     'Sparks fly when spirited Elizabeth Bennet meets single, rich, and proud Mr. Darcy. But Mr. Darcy reluctantly finds himself falling in love with a woman beneath his class. Can each overcome their own pride and prejudice?',
     'Joe Wright', 'Keira Knightley|Matthew Macfadyen|Brenda Blethyn'),
    ('tt3783958', 'La La Land', 2016, 'comedy|drama|music',
     'While navigating their careers in Los Angeles, a pianist and an actress fall in love while attempting to reconcile their aspirations for the future.',
     'Damien Chazelle', 'Ryan Gosling|Emma Stone|Rosemarie DeWitt'),
    ('tt1457767', 'The Conjuring', 2013, 'horror|mystery|thriller',
     'Paranormal investigators Ed and Lorraine Warren work to help a family terrorized by a dark presence in their farmhouse.',
     'James Wan', 'Patrick Wilson|Vera Farmiga|Ron Livingston'),
    ('tt1396484', 'It', 2017, 'horror',
     'In the summer of 1989, a group of bullied kids band together to destroy a shape-shifting monster, which disguises itself as a clown and preys on the children of Derry, their small Maine town.',
     'Andy Muschietti', 'Bill Skarsgård|Jaeden Martell|Finn Wolfhard'),
    ('tt0081505', 'The Shining', 1980, 'drama|horror',
     'A family heads to an isolated hotel for the winter where a sinister presence influences the father into violence, while his psychic son sees horrific forebodings from both past and future.',
     'Stanley Kubrick', 'Jack Nicholson|Shelley Duvall|Danny Lloyd'),
    ('tt5052448', 'Get Out', 2017, 'horror|mystery|thriller',
     "A young African-American visits his white girlfriend's parents for the weekend, where his simmering uneasiness about their reception of him eventually reaches a boiling point.",
     'Jordan Peele', 'Daniel Kaluuya|Allison Williams|Bradley Whitford'),
    ('tt0117571', 'Scream', 1996, 'horror|mystery',
     'A year after the murder of her mother, a teenage girl is terrorized by a new killer, who targets the girl and her friends by using horror films as part of a deadly game.',
     'Wes Craven', 'Neve Campbell|Courteney Cox|David Arquette'),
    ('tt0077651', 'Halloween', 1978, 'horror|thriller',
     'Fifteen years after murdering his sister on Halloween night 1963, Michael Myers escapes from a mental hospital and returns to the small town of Haddonfield, Illinois to kill again.',
     'John Carpenter', 'Donald Pleasence|Jamie Lee Curtis|Tony Moran'),
    ('tt0829482', 'Superbad', 2007, 'comedy',
     'Two co-dependent high school seniors are forced to deal with separation anxiety after their plan to stage a booze-soaked party goes awry.',
     'Greg Mottola', 'Michael Cera|Jonah Hill|Christopher Mintz-Plasse'),
    ('tt1119646', 'The Hangover', 2009, 'comedy',
     'Three buddies wake up from a bachelor party in Las Vegas, with no memory of the previous night and the bachelor missing. They make their way around the city in order to find their friend before his wedding.',
     'Todd Phillips', 'Zach Galifianakis|Bradley Cooper|Justin Bartha'),
    ('tt1478338', 'Bridesmaids', 2011, 'comedy|romance',
     "Competition between the maid of honor and a bridesmaid, over who is the bride's best friend, threatens to upend the life of an out-of-work pastry chef.",
     'Paul Feig', 'Kristen Wiig|Maya Rudolph|Rose Byrne'),
    ('tt0838283', 'Step Brothers', 2008, 'comedy',
     'Two aimless middle-aged losers still living at home are forced against their will to become roommates when their parents marry.',
     'Adam McKay', 'Will Ferrell|John C. Reilly|Mary Steenburgen'),
    ('tt0468569', 'The Dark Knight', 2008, 'action|crime|drama',
     'When the menace known as the Joker wreaks havoc and chaos on the people of Gotham, Batman must accept one of the greatest psychological and physical tests of his ability to fight injustice.',
     'Christopher Nolan', 'Christian Bale|Heath Ledger|Aaron Eckhart'),
    ('tt0095016', 'Die Hard', 1988, 'action|thriller',
     'An NYPD officer tries to save his wife and several others taken hostage by German terrorists during a Christmas party at the Nakatomi Plaza in Los Angeles.',
     'John McTiernan', 'Bruce Willis|Alan Rickman|Bonnie Bedelia'),
    ('tt1392190', 'Mad Max: Fury Road', 2015, 'action|adventure|sci-fi',
     'In a post-apocalyptic wasteland, a woman rebels against a tyrannical ruler in search for her homeland with the aid of a group of female prisoners, a psychotic worshiper, and a drifter named Max.',
     'George Miller', 'Tom Hardy|Charlize Theron|Nicholas Hoult'),
    ('tt2911666', 'John Wick', 2014, 'action|crime|thriller',
     'An ex-hit-man comes out of retirement to track down the gangsters that killed his dog and took everything from him.',
     'Chad Stahelski', 'Keanu Reeves|Michael Nyqvist|Alfie Allen'),
    ('tt0068646', 'The Godfather', 1972, 'crime|drama',
     'The aging patriarch of an organized crime dynasty in postwar New York City transfers control of his clandestine empire to his reluctant youngest son.',
     'Francis Ford Coppola', 'Marlon Brando|Al Pacino|James Caan'),
    ('tt0099685', 'Goodfellas', 1990, 'biography|crime|drama',
     'The story of Henry Hill and his life in the mob, covering his relationship with his wife Karen Hill and his mob partners Jimmy Conway and Tommy DeVito in the Italian-American crime syndicate.',
     'Martin Scorsese', 'Robert De Niro|Ray Liotta|Joe Pesci'),
    ('tt0110912', 'Pulp Fiction', 1994, 'crime|drama',
     'The lives of two mob hitmen, a boxer, a gangster and his wife, and a pair of diner bandits intertwine in four tales of violence and redemption.',
     'Quentin Tarantino', 'John Travolta|Uma Thurman|Samuel L. Jackson'),
]
ID = {title: imdb for imdb, title, *_ in MOVIES}

# user -> movies they interacted with (u1 twice with Star Wars: counted once)
INTERACTIONS = {
    "u1": ["Star Wars", "Star Wars", "The Dark Knight", "Titanic", "Toy Story", "Pulp Fiction"],
    "u2": ["Star Wars", "The Dark Knight", "Titanic", "Toy Story", "Pulp Fiction"],
    "u3": ["Star Wars", "The Dark Knight", "Titanic", "Toy Story"],
    "u4": ["Star Wars", "The Dark Knight", "Titanic"],
    "u5": ["Star Wars", "The Dark Knight"],
    "u6": ["Star Wars", "Frozen"],
}
POPULAR = ["Star Wars", "The Dark Knight", "Titanic", "Toy Story", "Pulp Fiction", "Frozen"]

# (query_id, status, query, [(title or None, item title or None, flagged)])
SYNTHETIC = [
    ("q1", "approved", "Looking for an epic space adventure with starships, aliens and laser battles",
     [("Star Trek", False), ("Guardians of the Galaxy", False), ("Star Wars", False),
      ("The Avengers", False)]),
    ("q2", "approved", "I want something hilarious to watch with my buddies, a raunchy comedy",
     [("Superbad", False), ("The Hangover", False), ("Step Brothers", False),
      ("Bridesmaids", False)]),
    ("q3", "approved", "A genuinely terrifying haunted house horror film",
     [("The Conjuring", False), (None, True), ("The Shining", False), ("It", False)]),
    ("q4", "rejected", "A sweeping romantic drama that makes me cry",
     [("Titanic", False), ("The Notebook", False)]),
    ("q5", "pending", "An animated movie my kids and I can both enjoy",
     [("Finding Nemo", False), ("Up", False)]),
    ("q6", "approved", "A movie that only has an unmatched answer", [(None, True)]),
]

# (dataset, turn_id, dialog_id, context, rec titles, mentioned titles)
TURNS = [
    ("toy_test", "t1", "d1", ["Hi there!", "I love space adventures like Star Wars, what else would I like?"],
     ["Star Trek"], ["Star Wars"]),
    ("toy_test", "t2", "d2", ["Hello", "My kids loved Toy Story, we want another animated movie",
                              "Maybe something about the ocean and fish?"],
     ["Finding Nemo", "Toy Story"], ["Toy Story"]),
    ("toy_test", "t3", "d3", ["I am in the mood for a scary movie about a killer clown"], ["It"], []),
    ("toy_test", "t4", "d3", ["I am in the mood for a scary movie about a killer clown",
                              "Have you seen Star Wars?", "Yes, Star Wars is great"],
     ["Star Wars"], ["Star Wars"]),
    ("toy_train", "r1", "d9", ["Any good mob movies?"], ["The Godfather", "Goodfellas"], []),
    ("toy_train", "r2", "d9", ["Any good mob movies?", "I loved The Godfather"],
     ["The Godfather", "Pulp Fiction"], ["The Godfather"]),
    ("toy_train", "r3", "d9", ["I only want The Godfather again"], ["The Godfather"], ["The Godfather"]),
]


def _ids(titles):
    return [ID[t] for t in titles]


def build_workspace(path: Path) -> Workspace:
    ws = Workspace(path)
    with ws.transaction() as cur:
        cur.executemany(
            "INSERT INTO items (item_id, title, year, genres, plot, directors, cast_names, imdb_id, sources) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'test')",
            [[imdb, t, y, g, p, d, c, imdb] for imdb, t, y, g, p, d, c in MOVIES],
        )
        cur.executemany(
            "INSERT INTO interactions (user_id, item_id, rating, ts, source) VALUES (?, ?, 5, 0, 'test')",
            [[u, ID[t]] for u, titles in INTERACTIONS.items() for t in titles],
        )
        for n, (qid, status, query, gt) in enumerate(SYNTHETIC):
            cur.execute(
                "INSERT INTO synthetic_queries (query_id, item_id, query, status, created_at) "
                "VALUES (?, NULL, ?, ?, TIMESTAMP '2024-01-01 00:00:00' + INTERVAL (?) SECOND)",
                [qid, query, status, n],
            )
            cur.executemany(
                "INSERT INTO ground_truth (query_id, rank, title_raw, item_id, match_score, flagged) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [[qid, r, title or "Unknown Movie (1999)", ID[title] if title else None,
                  1.0 if title else None, flagged]
                 for r, (title, flagged) in enumerate(gt, start=1)],
            )
        cur.executemany(
            "INSERT INTO dialogue_turns VALUES (?, ?, ?, ?, '', ?, ?, ?)",
            [[ds, tid, did, json.dumps(ctx), json.dumps(_ids(rec)), json.dumps(rec),
              json.dumps(_ids(men))] for ds, tid, did, ctx, rec, men in TURNS],
        )
    return ws


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    w = build_workspace(tmp_path_factory.mktemp("recs") / "ws.duckdb")
    yield w
    w.close()


@pytest.fixture(scope="module")
def encoder():
    # the exact (fp32) MiniLM: loads in a fraction of the int8 default's calibration time and
    # gives batch-independent vectors; the recommenders take any encoder
    return default_encoder("minilm-fp32")


@pytest.fixture(scope="module")
def dense(ws, encoder):
    rec = DenseRetrieval(ws, encoder=encoder)
    rec.fit(None)
    return rec


def titles(ids):
    by_id = {imdb: t for imdb, t, *_ in MOVIES}
    return [by_id[i] for i in ids]


# ----------------------------------------------------------------------------- training sets


def test_training_set_from_synthetic_keeps_approved_unflagged_in_rank_order(ws):
    ts = training_set_from_synthetic(ws)
    assert [e.example_id for e in ts] == ["q1", "q2", "q3"]  # q6 has no usable label
    assert ts.n_dropped == 1
    assert ts[0].context == [SYNTHETIC[0][2]]
    assert titles(ts[0].labels) == ["Star Trek", "Guardians of the Galaxy", "Star Wars", "The Avengers"]
    assert titles(ts[2].labels) == ["The Conjuring", "The Shining", "It"]  # flagged rank 2 left out
    both = training_set_from_synthetic(ws, statuses=("approved", "pending"))
    assert [e.example_id for e in both] == ["q1", "q2", "q3", "q5"]
    with pytest.raises(RecommenderError):
        training_set_from_synthetic(ws, statuses=())


def test_training_set_from_turns_drops_mentioned_labels(ws):
    ts = training_set_from_turns(ws, "toy_train")
    assert [e.example_id for e in ts] == ["r1", "r2"]  # r3 only repeats a mentioned movie
    assert ts.n_dropped == 1
    assert titles(ts[1].labels) == ["Pulp Fiction"]
    assert ts[1].context == ["Any good mob movies?", "I loved The Godfather"]
    with pytest.raises(RecommenderError, match="no dialogue turns"):
        training_set_from_turns(ws, "nope")


def test_texts():
    assert context_text(["", "a", "b", "c", "d"]) == "b c d"
    assert context_text("just one") == "just one"
    long = ["x" * 10, " ".join(["word"] * 400) + " LAST"]
    text = context_text(long, max_chars=100)
    assert text.endswith("LAST") and len(text) <= 100 and not text.startswith("ord")
    # one item text everywhere: the catalog's (a float year from a column with NULLs prints as a year)
    row = {"title": "Alien", "year": 1979.0, "genres": "horror|sci-fi", "plot": "A crew meets a lifeform.",
           "cast_names": "Sigourney Weaver|Tom Skerritt|John Hurt|Ian Holm|Harry Dean Stanton"}
    assert item_text(row) == ("Alien (1979). Genres: horror, sci-fi. A crew meets a lifeform. "
                              "Starring Sigourney Weaver, Tom Skerritt, John Hurt, Ian Holm.")
    assert item_text({"title": "Untitled", "year": float("nan")}) == "Untitled."


# ----------------------------------------------------------------------------- popularity


def test_popularity_from_interactions_counts_distinct_users_and_honours_exclusion(ws):
    pop = Popularity(ws)
    assert isinstance(pop, Recommender)
    pop.fit(None)
    out = pop.recommend([["a"], ["b"], ["c"]], 6,
                        exclude=[set(), {ID["Star Wars"], ID["Titanic"]}, {"not-in-catalog"}])
    assert titles(out[0]) == POPULAR
    assert titles(out[1])[:4] == ["The Dark Knight", "Toy Story", "Pulp Fiction", "Frozen"]
    assert len(out[1]) == 6 and ID["Star Wars"] not in out[1]
    assert titles(out[2]) == POPULAR
    # k larger than the catalog: every item once, nothing invented
    assert sorted(pop.recommend([[""]], 1000)[0]) == sorted(ID.values())


def test_popularity_from_labels(ws):
    pop = Popularity(ws, source="labels")
    with pytest.raises(RecommenderError, match="not fitted"):
        pop.recommend([["x"]], 3)
    ts = TrainingSet.from_pairs([
        ("q", [ID["Alien"], ID["Up"]]), ("q", [ID["Up"]]), ("q", [ID["Up"], ID["Alien"], ID["Frozen"]]),
    ])
    pop.fit(ts)
    top = titles(pop.recommend([["x"]], 5)[0])
    # Up 3, Alien 2, Frozen 1 (label counts), then interaction popularity fills the list
    assert top == ["Up", "Alien", "Frozen", "Star Wars", "The Dark Knight"]


def test_popularity_without_interactions_is_a_clear_error(tmp_path):
    w = Workspace(tmp_path / "empty.duckdb")
    with w.transaction() as cur:
        cur.execute("INSERT INTO items (item_id, title) VALUES ('a', 'A')")
    with pytest.raises(RecommenderError, match="no interactions"):
        Popularity(w)
    with pytest.raises(RecommenderError, match="unknown recommender"):
        make_recommender("magic", w)
    w.close()
    with pytest.raises(RecommenderError, match="no items"):
        Popularity(Workspace(tmp_path / "none.duckdb"))


# ----------------------------------------------------------------------------- dense retrieval


@pytest.mark.parametrize("context, expected", [
    (["Hi", "An astronaut gets stranded alone on Mars and has to survive"], "The Martian"),
    (["a comedy about three friends who lose the groom after a bachelor party in Las Vegas"], "The Hangover"),
    (["I am in the mood for a scary movie about a killer clown"], "It"),
    (["I want a mafia film about a crime family and the godfather's son"], "The Godfather"),
    (["My kids want a cartoon", "Something about a clownfish looking for his son in the ocean"], "Finding Nemo"),
    (["A hitman takes revenge on the gangsters who killed his dog"], "John Wick"),
])
def test_dense_retrieval_ranks_the_obvious_item_in_top3(dense, context, expected):
    top = titles(dense.recommend([context], 3)[0])
    assert expected in top, top


def test_dense_retrieval_batches_and_honours_exclusion(dense):
    contexts = [["I love space adventures like Star Wars, what else would I like?"]] * 3 + [["horror"]]
    out = dense.recommend(contexts, 10, exclude=[{ID["Star Wars"]}, set(), {ID["Star Trek"], ID["Star Wars"]}, set()])
    assert len(out) == 4 and all(len(r) == 10 and len(set(r)) == 10 for r in out)
    assert ID["Star Wars"] not in out[0]
    assert "Star Trek" in titles(out[0])[:3]
    assert not {ID["Star Trek"], ID["Star Wars"]} & set(out[2])
    assert out[1][0] == ID["Star Wars"]  # the movie named in the context wins when allowed
    assert dense.recommend([], 5) == []
    with pytest.raises(RecommenderError, match="exclude has"):
        dense.recommend([["a"], ["b"]], 5, exclude=[set()])


def test_candidates_limit_every_recommender(ws, dense, encoder):
    allowed = {ID["Alien"], ID["Up"], ID["Frozen"], ID["Titanic"]}
    nb = NBCRS(ws, encoder=encoder)
    nb.fit(training_set_from_synthetic(ws))
    for rec in (dense, Popularity(ws), nb):
        out = rec.recommend([["space"], ["kids"]], 3, exclude=[{ID["Alien"]}, set()],
                            candidates=allowed)
        assert [len(r) for r in out] == [3, 3], rec.name
        assert set(out[0]) == allowed - {ID["Alien"]} and set(out[1]) <= allowed, rec.name
    assert titles(Popularity(ws).recommend([["x"]], 2, candidates=allowed)[0]) == ["Titanic", "Frozen"]


def test_dense_item_embeddings_are_cached(ws, encoder, dense):
    again = DenseRetrieval(ws, encoder=encoder)
    again.fit(None)
    assert again._items is dense._items  # same catalog + encoder: no re-encoding
    assert dense.name == "dense-minilm-fp32"
    assert DenseRetrieval(ws).name == "dense-minilm"  # the default encoder (not loaded here)


# ----------------------------------------------------------------------------- NBCRS


def test_nbcrs_recommends_items_of_the_nearest_training_queries(ws, encoder):
    ts = training_set_from_synthetic(ws)
    nb = NBCRS(ws, encoder=encoder, n_neighbors=1)
    with pytest.raises(RecommenderError, match="not fitted"):
        nb.recommend([["x"]], 3)
    nb.fit(ts)
    out = nb.recommend(
        [["Hi", "Any epic space adventures with aliens and starships?"],
         ["I need a good laugh with friends tonight, something raunchy"],
         ["something really scary, like a haunted house"],
         ["Any epic space adventures with aliens and starships?"]],
        4,
        exclude=[set(), set(), set(), {ID["Star Trek"]}],
    )
    # one neighbour: its labels in its own (rank-discounted) order
    assert titles(out[0]) == ["Star Trek", "Guardians of the Galaxy", "Star Wars", "The Avengers"]
    assert titles(out[1]) == ["Superbad", "The Hangover", "Step Brothers", "Bridesmaids"]
    assert titles(out[2])[:3] == ["The Conjuring", "The Shining", "It"]
    # the rest is filled by popularity (label frequency, then interactions): Star Wars
    assert titles(out[2])[3] == "Star Wars"
    assert titles(out[3])[:3] == ["Guardians of the Galaxy", "Star Wars", "The Avengers"]
    # ... and after the neighbour's items come other training labels (before The Dark Knight,
    # which is popular with users but never a label)
    labelled = {t for e in ts for t in titles(e.labels)}
    assert titles(out[3])[3] in labelled - {"Star Trek", "Guardians of the Galaxy", "Star Wars",
                                            "The Avengers"}


def test_nbcrs_votes_are_similarity_weighted_over_neighbours(ws, encoder):
    ts = TrainingSet.from_pairs([
        ("space adventure with starships", [ID["Star Trek"]]),
        ("space adventure with starships and aliens", [ID["Star Trek"], ID["Alien"]]),
        ("a romantic drama", [ID["Titanic"]]),
    ])
    nb = NBCRS(ws, encoder=encoder, n_neighbors=3, rank_weight="none")
    nb.fit(ts)
    scores = nb.scores([["space adventure with starships"]])[0]
    idx = nb.catalog.index
    # Star Trek gets both space neighbours' similarity, Alien one of them, Titanic the romance's
    assert scores[idx[ID["Star Trek"]]] > scores[idx[ID["Alien"]]] > scores[idx[ID["Titanic"]]] >= 0
    # identical text: cosine 1
    assert scores[idx[ID["Star Trek"]]] == pytest.approx(scores[idx[ID["Alien"]]] + 1.0, abs=1e-4)
    out = nb.recommend([["space adventure with starships"], ["romance"]], 5)
    assert [len(r) for r in out] == [5, 5]
    assert titles(out[0])[:2] == ["Star Trek", "Alien"]
    assert titles(out[1])[0] == "Titanic"


def test_nbcrs_needs_labels_in_the_catalog(ws, encoder):
    nb = NBCRS(ws, encoder=encoder)
    with pytest.raises(RecommenderError, match="none qualifies"):
        nb.fit(TrainingSet.from_pairs([("q", ["not-an-item"])]))
    with pytest.raises(RecommenderError):
        NBCRS(ws, n_neighbors=0)


# ----------------------------------------------------------------------------- with evaluate


def test_evaluate_dense_and_popularity_on_toy_dialogues(ws, dense):
    res = evaluate(ws, dense, "toy_test", k_max=20)
    assert res.n_total == 4 and res.n_skipped == 1 and res.n_turns == 3
    assert set(res.metrics) == {"recall@1", "recall@5", "recall@10", "recall@20",
                                "ndcg@5", "ndcg@10", "ndcg@20"}
    assert res.value("recall@5") == 1.0  # Star Trek, Finding Nemo, It: all in the top 5
    mentioned = {tid: set(_ids(men)) for _, tid, _, _, _, men in TURNS}
    for t in res.turns:
        assert len(t.ranked) == 20 and not set(t.ranked) & mentioned[t.turn_id]
    pop = evaluate(ws, Popularity(ws), "toy_test", k_max=20)
    assert pop.value("recall@5") == 0.0
    with pytest.raises(Exception, match="larger than the catalog"):
        evaluate(ws, dense, "toy_test", k_max=50)  # 36 items


def test_catalog_checks():
    with pytest.raises(RecommenderError, match="duplicate"):
        Catalog(["a", "a"])
    cat = Catalog(["a", "b", "c"])
    assert cat.exclude_indices([{"b", "zzz"}], 1) == [[1]]
    sub = Catalog(["a", "b", "c"], ["ta", "tb", "tc"], [1, 2, 3]).subset({"c", "a", "zzz"})
    assert sub.item_ids.tolist() == ["a", "c"] and sub.texts == ["ta", "tc"]
    assert sub.interaction_counts.tolist() == [1, 3]
    with pytest.raises(RecommenderError, match="none of the given item ids"):
        cat.subset({"zzz"})


def test_retriever_encoder_needs_a_trained_retriever_folder(tmp_path):
    from crs_core.recommenders import RetrieverEncoder

    with pytest.raises(RecommenderError, match="not a trained retriever folder"):
        RetrieverEncoder(tmp_path / "missing")
    folder = tmp_path / "lm"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "crs_model.json").write_text(json.dumps({"type": "lora"}))
    with pytest.raises(RecommenderError, match="'lora' model, not a dense retriever"):
        RetrieverEncoder(folder)


def test_item_embeddings_go_to_the_workspace_cache(encoder, tmp_path):
    from crs_core.embed import text_hash
    from crs_core.recommenders_base import _ITEM_CACHE, item_embeddings

    class Counting:  # the real encoder, counting what it is asked to encode
        def __init__(self, inner):
            self.inner, self.n, self.name, self.dim = inner, 0, inner.name, inner.dim

        def encode(self, texts):
            self.n += len(texts)
            return self.inner.encode(texts)

    path = tmp_path / "cache.duckdb"
    w = Workspace(path)
    with w.transaction() as cur:
        cur.executemany("INSERT INTO items (item_id, title, year, genres, plot) VALUES (?, ?, ?, ?, ?)",
                        [[imdb, t, y, g, p] for imdb, t, y, g, p, *_ in MOVIES[:4]])
    cat = Catalog.from_workspace(w)
    counting = Counting(encoder)
    first = item_embeddings(cat, counting, w)
    assert counting.n == 4 and first.shape == (4, encoder.dim)
    stored = set(w.df("SELECT text_hash FROM embedding_cache WHERE model = ?",
                      [encoder.name])["text_hash"])
    assert {text_hash(t) for t in cat.texts} <= stored
    assert item_embeddings(cat, counting, w) is first and counting.n == 4  # in-process cache
    w.close()
    # a read-only workspace (e.g. opened for a measurement) reads the cache, encodes nothing
    _ITEM_CACHE.clear()
    ro = Workspace(path, read_only=True)
    again = item_embeddings(Catalog.from_workspace(ro), counting, ro)
    ro.close()
    assert counting.n == 4 and np.abs(again - first).max() < 1e-6


# ----------------------------------------------------------------------------- hybrid


class _NoTestTurns:
    """The workspace as a fit may see it: reads through `df` only, never a dialogue turn."""

    read_only = True

    def __init__(self, ws):
        self._ws, self.queries = ws, []
        self.path = ws.path

    def df(self, sql, params=None):
        self.queries.append(sql)
        assert "dialogue_turns" not in sql.lower(), f"the fit read dialogue turns: {sql}"
        return self._ws.df(sql, params)

    def cursor(self):
        raise AssertionError("the fit must not need a cursor (writes, or SQL around df)")

    transaction = cursor


def test_hybrid_fits_on_training_data_only_and_uses_mentioned_items(ws, encoder):
    from crs_core.recommenders import HYBRID_GRID_CF, HYBRID_GRID_POP, Hybrid

    guard = _NoTestTurns(ws)
    train = TrainingSet.from_pairs([
        (["Any good mob movies?"], _ids(["The Godfather", "Goodfellas"])),
        (["Something about space please"], _ids(["Star Trek"])),
        (["I want a space movie, and one more"], _ids(["Star Trek", "Interstellar"])),
        (["Toons for the kids"], _ids(["Toy Story"])),
        (["Another cartoon for the kids"], _ids(["Toy Story", "Finding Nemo"])),
    ], name="toy_train")
    hybrid = Hybrid(guard, encoder=encoder, val_fraction=0.4)
    hybrid.fit(train)
    assert guard.queries and all("dialogue_turns" not in q.lower() for q in guard.queries)
    rep = hybrid.fit_report
    assert rep["fit_turns"] + rep["validation_turns"] == 5 and rep["validation_turns"] >= 2
    assert len(rep["grid"]) == len(HYBRID_GRID_CF) * len(HYBRID_GRID_POP)
    assert hybrid.weights in {(g["w_cf"], g["w_pop"]) for g in rep["grid"]}
    with pytest.raises(RecommenderError, match="test split"):
        Hybrid(guard, encoder=encoder).fit(TrainingSet(list(train), name="toy_test"))

    # the parts: popularity counts training labels; CF scores items co-rated with the mentioned ones
    pop = hybrid._popularity(list(train))
    assert pop[hybrid.catalog.index[ID["Star Trek"]]] == pop.max() and pop[hybrid.catalog.index[ID["Alien"]]] == 0
    cf = hybrid.cf_scores([{ID["Titanic"]}, set()])
    order = [hybrid.catalog.item_ids[i] for i in np.argsort(-cf[0])]
    assert order[:2] == _ids(["Titanic", "The Dark Knight"]) and not cf[1].any()
    fixed = Hybrid(guard, encoder=encoder, weights=(10.0, 0.0))  # CF dominates
    fixed.fit(train)
    ctx = [["Hello", "My favourite movie is Titanic, what else?"]]
    with_cf = fixed.recommend(ctx, 3, exclude=[{ID["Titanic"]}])[0]
    assert ID["Titanic"] not in with_cf and with_cf[0] == ID["The Dark Knight"]  # co-rated by every Titanic fan
    assert make_recommender("hybrid", ws, encoder=encoder).name.startswith("hybrid-")


def test_a_registered_recommender_reaches_the_cli_and_the_evaluation_page(monkeypatch, studio_workspace_file,
                                                                         tmp_path):
    from conftest import cli_choices, copy_workspace, studio_page
    from crs_core import recommenders

    entry = recommenders.RecommenderKind("popularity-test", "Popularity (a test entry)",
                                         lambda ws, **kw: recommenders.Popularity(ws, source="interactions", **kw))
    monkeypatch.setitem(recommenders.RECOMMENDERS, entry.name, entry)
    assert "popularity-test" in cli_choices("eval", "--model")
    at = studio_page(monkeypatch, copy_workspace(studio_workspace_file, tmp_path / "recs.duckdb"), "pages/evaluation.py")
    assert "Popularity (a test entry)" in at.selectbox(key="ev_kind").options
