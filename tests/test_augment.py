"""FNSCRS label augmentation (crs_core.augment) on a small real workspace.

The workspace (built with SQL in tmp_path) holds 40 real films with plots, one title-only item
and ten INSPIRED-style training turns (one without any context). The teacher is the
OpenAI-compatible stub server on 127.0.0.1 (tests/openai_stub_server.py), answering the paper's
relevance prompt like a chat model would: prose and a JSON object, a fenced JSON object with
scores as strings, or a JSON list, by request; out-of-range scores for one dialogue and garbage
for another (first ask only). Retrieval uses the real MiniLM encoder.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from crs_core import augment as A  # noqa: E402
from crs_core import augment_scoring, llm_output, prompts  # noqa: E402
from crs_core.errors import CRSError  # noqa: E402
from crs_core.store import Workspace  # noqa: E402
from crs_core.teacher import Teacher, TeacherConfig  # noqa: E402
from openai_stub_server import Fault, OpenAIStubServer  # noqa: E402

KEY = "sk-test-augment"
DATASET = "inspired_train"

# (item_id, title, year, genres, plot, cast, stub tags: the first is the film's main one)
FILMS = [
    ("tt0113277", "Heat", 1995, "action|crime|drama", "A group of high-end professional thieves led by Neil McCauley plan bank robberies in Los Angeles while an obsessive LAPD detective hunts them.", "Al Pacino|Robert De Niro|Val Kilmer", ["crime"]),
    ("tt0122690", "Ronin", 1998, "action|crime|thriller", "A team of hardened mercenaries is hired in France to steal a mysterious briefcase, leading to car chases through Paris and Nice.", "Robert De Niro|Jean Reno", ["crime"]),
    ("tt0840361", "The Town", 2010, "crime|drama|thriller", "A longtime Boston bank robber falls for the bank manager his crew took hostage during their last heist, while the FBI closes in.", "Ben Affleck|Rebecca Hall|Jon Hamm", ["crime", "romance"]),
    ("tt0240772", "Ocean's Eleven", 2001, "crime|thriller", "Danny Ocean and his crew of eleven con men plan to rob three Las Vegas casinos at once in an elaborate heist.", "George Clooney|Brad Pitt|Matt Damon", ["crime", "comedy"]),
    ("tt0454848", "Inside Man", 2006, "crime|drama|mystery|thriller", "A police detective negotiates with a meticulous bank robber who has taken hostages inside a Manhattan bank during a perfect heist.", "Denzel Washington|Clive Owen|Jodie Foster", ["crime"]),
    ("tt3890160", "Baby Driver", 2017, "action|crime|music", "A young getaway driver who relies on music to drown out his tinnitus is coerced into working for a crime boss on a doomed robbery.", "Ansel Elgort|Kevin Spacey|Lily James", ["crime", "romance"]),
    ("tt0105236", "Reservoir Dogs", 1992, "crime|thriller", "After a jewelry store robbery goes wrong, the surviving criminals suspect one of them is a police informant.", "Harvey Keitel|Tim Roth|Steve Buscemi", ["crime"]),
    ("tt0425112", "Hot Fuzz", 2007, "action|comedy|mystery", "A top London police officer is transferred to a sleepy English village where a series of gruesome accidents turn out to be murders.", "Simon Pegg|Nick Frost", ["cop", "comedy"]),
    ("tt1386588", "The Other Guys", 2010, "action|comedy|crime", "Two mismatched New York City detectives who sit at their desks get a chance to step up like the city's top cops.", "Will Ferrell|Mark Wahlberg", ["cop", "comedy"]),
    ("tt0247745", "Super Troopers", 2001, "comedy|crime|mystery", "Five Vermont state troopers, avid pranksters with a knack for screwing up, try to save their jobs by solving a murder.", "Jay Chandrasekhar|Kevin Heffernan", ["cop", "comedy"]),
    ("tt1232829", "21 Jump Street", 2012, "action|comedy|crime", "Two bumbling police officers go undercover as high school students to bust a synthetic drug ring.", "Jonah Hill|Channing Tatum", ["cop", "comedy"]),
    ("tt0087928", "Police Academy", 1984, "comedy|crime", "A group of misfits and slobs enroll in a police academy after the city drops its entry requirements.", "Steve Guttenberg|Kim Cattrall", ["cop", "comedy"]),
    ("tt0120812", "Rush Hour", 1998, "action|comedy|crime", "A loyal Hong Kong detective and a loudmouthed LAPD cop team up to rescue the kidnapped daughter of a Chinese diplomat.", "Jackie Chan|Chris Tucker", ["cop", "comedy"]),
    ("tt0078748", "Alien", 1979, "horror|sci-fi", "The crew of the commercial spaceship Nostromo encounter a deadly alien creature that hunts them one by one.", "Sigourney Weaver|Tom Skerritt", ["scifi", "horror"]),
    ("tt0083658", "Blade Runner", 1982, "action|drama|sci-fi|thriller", "In a dystopian Los Angeles, a blade runner must pursue and terminate four replicants, artificial humans who escaped to Earth.", "Harrison Ford|Rutger Hauer|Sean Young", ["scifi"]),
    ("tt0133093", "The Matrix", 1999, "action|sci-fi", "A computer hacker learns that reality is a simulation created by intelligent machines and joins the rebellion against them.", "Keanu Reeves|Laurence Fishburne|Carrie-Anne Moss", ["scifi"]),
    ("tt0816692", "Interstellar", 2014, "adventure|drama|sci-fi", "A team of explorers travel through a wormhole in space in an attempt to ensure humanity's survival on a dying Earth.", "Matthew McConaughey|Anne Hathaway|Jessica Chastain", ["scifi"]),
    ("tt2543164", "Arrival", 2016, "drama|mystery|sci-fi", "A linguist works with the military to communicate with alien lifeforms after twelve mysterious spacecraft appear around the world.", "Amy Adams|Jeremy Renner", ["scifi"]),
    ("tt1454468", "Gravity", 2013, "drama|sci-fi|thriller", "Two astronauts work together to survive after an accident leaves them stranded in space above the Earth.", "Sandra Bullock|George Clooney", ["scifi"]),
    ("tt0114709", "Toy Story", 1995, "animation|adventure|comedy|family", "A cowboy doll is profoundly threatened when a new spaceman action figure supplants him as top toy in a boy's room.", "Tom Hanks|Tim Allen", ["family", "comedy"]),
    ("tt0266543", "Finding Nemo", 2003, "animation|adventure|comedy|family", "After his son is captured in the Great Barrier Reef and taken to Sydney, a timid clownfish sets out on a journey to bring him home.", "Albert Brooks|Ellen DeGeneres", ["family"]),
    ("tt1049413", "Up", 2009, "animation|adventure|comedy|family", "An elderly widower ties thousands of balloons to his house and flies to South America, with a young wilderness explorer stowed away.", "Ed Asner|Jordan Nagai", ["family"]),
    ("tt2294629", "Frozen", 2013, "animation|adventure|comedy|family|musical", "A fearless princess sets off on a journey with a mountain man and his reindeer to find her sister, whose icy powers trapped the kingdom in eternal winter.", "Kristen Bell|Idina Menzel", ["family"]),
    ("tt0126029", "Shrek", 2001, "animation|adventure|comedy|family|fantasy", "A grumpy ogre sets out with a talkative donkey to rescue a princess so that a lord will give his swamp back.", "Mike Myers|Eddie Murphy|Cameron Diaz", ["family", "comedy"]),
    ("tt2380307", "Coco", 2017, "animation|adventure|family|music", "Aspiring musician Miguel enters the Land of the Dead to find his great-great-grandfather, a legendary singer.", "Anthony Gonzalez|Gael Garcia Bernal", ["family"]),
    ("tt1457767", "The Conjuring", 2013, "horror|mystery|thriller", "Paranormal investigators Ed and Lorraine Warren help a family terrorized by a dark presence in their farmhouse.", "Patrick Wilson|Vera Farmiga", ["horror"]),
    ("tt1396484", "It", 2017, "horror", "In the summer of 1989, a group of bullied kids band together to destroy a shape-shifting monster that disguises itself as a clown and preys on children.", "Bill Skarsgard|Jaeden Martell", ["horror"]),
    ("tt5052448", "Get Out", 2017, "horror|mystery|thriller", "A young African-American man visits his white girlfriend's parents for the weekend, where his uneasiness about their reception reaches a boiling point.", "Daniel Kaluuya|Allison Williams", ["horror"]),
    ("tt7784604", "Hereditary", 2018, "drama|horror|mystery", "A grieving family is haunted by tragic and disturbing occurrences after the death of their secretive grandmother.", "Toni Collette|Alex Wolff", ["horror"]),
    ("tt0175142", "Scary Movie", 2000, "comedy|horror", "A year after disposing of the body of a man they accidentally killed, a group of dumb teenagers are stalked by a bumbling serial killer in this spoof.", "Anna Faris|Marlon Wayans", ["comedy", "horror"]),
    ("tt0332280", "The Notebook", 2004, "drama|romance", "A poor yet passionate young man falls in love with a rich young woman, giving her a sense of freedom, but they are soon separated by their social differences.", "Ryan Gosling|Rachel McAdams", ["romance"]),
    ("tt0120338", "Titanic", 1997, "drama|romance", "A seventeen-year-old aristocrat falls in love with a kind but poor artist aboard the luxurious, ill-fated R.M.S. Titanic.", "Leonardo DiCaprio|Kate Winslet", ["romance"]),
    ("tt3783958", "La La Land", 2016, "comedy|drama|music|romance", "While navigating their careers in Los Angeles, a pianist and an actress fall in love while attempting to reconcile their aspirations for the future.", "Ryan Gosling|Emma Stone", ["romance"]),
    ("tt0414387", "Pride & Prejudice", 2005, "drama|romance", "Sparks fly when spirited Elizabeth Bennet meets single, rich and proud Mr. Darcy in Georgian England.", "Keira Knightley|Matthew Macfadyen", ["romance"]),
    ("tt3104988", "Crazy Rich Asians", 2018, "comedy|drama|romance", "A New York economics professor travels to Singapore to meet her boyfriend's family and discovers he comes from one of the richest families in Asia.", "Constance Wu|Henry Golding", ["romance", "comedy"]),
    ("tt0120815", "Saving Private Ryan", 1998, "drama|war", "Following the Normandy landings in World War II, a group of U.S. soldiers go behind enemy lines to retrieve a paratrooper whose brothers have been killed in action.", "Tom Hanks|Matt Damon", ["war"]),
    ("tt5013056", "Dunkirk", 2017, "action|drama|history|thriller|war", "Allied soldiers from Belgium, the British Commonwealth and France are surrounded by the German army and evacuated during a fierce battle in World War II.", "Fionn Whitehead|Tom Hardy", ["war"]),
    ("tt8579674", "1917", 2019, "action|drama|war", "Two young British soldiers during the First World War are given an impossible mission: deliver a message deep in enemy territory.", "George MacKay|Dean-Charles Chapman", ["war"]),
    ("tt2119543", "Hacksaw Ridge", 2016, "biography|drama|history|war", "World War II American Army medic Desmond Doss serves during the Battle of Okinawa, refusing to kill people and becoming the first conscientious objector awarded the Medal of Honor.", "Andrew Garfield|Vince Vaughn", ["war"]),
    ("tt8946378", "Knives Out", 2019, "comedy|crime|drama|mystery", "A detective investigates the death of the patriarch of an eccentric, combative family after his 85th birthday party.", "Daniel Craig|Chris Evans|Ana de Armas", ["mystery", "comedy"]),
]
TITLE_ONLY = ("dialogue:lost reels (1931)", "Lost Reels", 1931)
BY_TITLE = {f"{t} ({y})": tags for _, t, y, _, _, _, tags in FILMS}
IDS = {t: i for i, t, *_ in FILMS}

# (turn id, context, recommended item ids, mentioned item ids)
TURNS = [
    ("d1/2", ["Hi! What kind of movies do you like to watch?",
              "I love heist movies, something with a clever bank robbery and a great crew."],
     [IDS["Heat"]], []),
    ("d2/4", ["Hello, what are you in the mood for tonight?",
              "Something funny with cops, like Super Troopers (2001). My husband loves silly police comedies."],
     [IDS["Hot Fuzz"]], [IDS["Super Troopers"]]),
    ("d3/2", ["Hey there! What genres do you enjoy?",
              "I want a smart science fiction film about space travel and astronauts."],
     [IDS["Interstellar"]], []),
    ("d4/2", ["What can I recommend to you today?",
              "A movie for family night with my kids, an animated adventure would be great."],
     [IDS["Toy Story"]], []),
    ("d5/4", ["Hi", "I'm looking for a scary horror movie that will keep me up at night.",
              "Have you seen The Conjuring (2013)?",
              "Yes, I loved it! Something else that frightening?"],
     [IDS["Hereditary"]], [IDS["The Conjuring"]]),
    ("d6/2", ["What are you looking for?", "Romantic movies please, a love story that makes me cry."],
     [IDS["The Notebook"]], []),
    ("d7/2", ["Hello! How can I help?", "I like war movies about World War II soldiers and big battles."],
     [IDS["Saving Private Ryan"], IDS["Dunkirk"]], []),
    ("d8/1", ["", "   "], [IDS["Titanic"]], []),
    ("d9/2", ["Hi, what do you want to watch?",
              "A thoughtful movie about robots and artificial intelligence, maybe set in the future."],
     [IDS["Blade Runner"]], []),
    ("d10/2", ["Hello!", "I want a hilarious comedy, the more ridiculous the better."],
     [], []),
]
GOOD_TURNS = [t for t in TURNS if any(u.strip() for u in t[1])]
CONTEXT_TAGS = {  # keyword -> tag the stub teacher reads from a dialogue
    "heist": "crime", "robbery": "crime", "police comed": "cop", "cops": "cop", "science fiction": "scifi",
    "space": "scifi", "robots": "scifi", "artificial intelligence": "scifi", "animated": "family",
    "kids": "family", "horror": "horror", "frightening": "horror", "romantic": "romance",
    "love story": "romance", "war movies": "war", "hilarious comedy": "comedy",
}


# ---------------------------------------------------------------------------------- stub teacher
def dialogue_of(prompt: str) -> str:
    return prompt.split("Dialogue history:\n\n", 1)[1].split("\n\nrecommender's recommendation:\n\n", 1)[0]


def listed_titles(prompt: str) -> list[str]:
    block = prompt.split("recommender's recommendation:\n\n", 1)[1].split("\n\nGive brief reason", 1)[0]
    return [re.sub(r"^\d+\.\s*", "", ln).split(" — ")[0] for ln in block.splitlines()]


def stub_score(dialogue: str, title: str) -> float:
    """What the stub teacher answers (before the parser clips anything)."""
    wanted = {tag for key, tag in CONTEXT_TAGS.items() if key in dialogue.lower()}
    tags = BY_TITLE.get(title, [])
    if "comedy" in wanted and "cop" not in wanted:   # the over-excited dialogue: out of range
        return 5 if tags and tags[0] == "comedy" or "comedy" in tags else -1
    if tags and tags[0] in wanted:
        return 4
    if set(tags[1:]) & wanted:
        return 2
    return 0


def expected_score(dialogue: str, title: str) -> float:
    return min(4.0, max(0.0, float(stub_score(dialogue, title))))


class StubTeacherReply:
    """Replies in three formats by request; garbage on the first ask about robots."""

    def __init__(self) -> None:
        self.n = 0
        self.garbage_sent: set[str] = set()

    def __call__(self, messages: list[dict]) -> str:
        prompt = messages[-1]["content"]
        if not prompt.startswith("You are provided with a dialogue history"):
            return "echo"
        self.n += 1
        dialogue, titles = dialogue_of(prompt), listed_titles(prompt)
        if "robots" in dialogue and prompt not in self.garbage_sent:  # the retry asks the same again
            self.garbage_sent.add(prompt)
            return "I am sorry, these all sound like fine movies to me!"
        scores = {t: stub_score(dialogue, t) for t in titles}
        kind = self.n % 3
        if kind == 0:
            return "The user wants specific genres; here are my scores.\n" + json.dumps(scores)
        if kind == 1:
            return "```json\n" + json.dumps({t: str(s) for t, s in scores.items()}) + "\n```"
        return json.dumps([{"movie": re.sub(r"\s*\(\d{4}\)$", "", t), "score": s} for t, s in scores.items()])


# ---------------------------------------------------------------------------------- fixtures
def build_workspace(path: Path) -> Workspace:
    ws = Workspace(path)
    with ws.transaction() as cur:
        cur.executemany(
            "INSERT INTO items (item_id, title, year, genres, plot, cast_names, imdb_id, sources) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, 'test')",
            [[i, t, y, g, p, c, i] for i, t, y, g, p, c, _ in FILMS])
        cur.execute("INSERT INTO items (item_id, title, year, sources) VALUES (?, ?, ?, 'dialogue')", list(TITLE_ONLY))
        cur.executemany(
            "INSERT INTO dialogue_turns VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [[DATASET, tid, tid.split("/")[0], json.dumps(ctx), "How about this one?", json.dumps(rec),
              json.dumps(rec), json.dumps(ment)] for tid, ctx, rec, ment in TURNS])
        cur.execute("INSERT INTO dialogue_turns VALUES ('inspired_test', 't1/2', 't1', ?, 'x', ?, '[]', '[]')",
                    [json.dumps(["Hi", "Any heist movie?"]), json.dumps([IDS["Heat"]])])
        # popularity: many users for a few blockbusters
        rows = [[f"u{u}", IDS[t], 4.0] for u in range(10) for t in ("Titanic", "The Matrix", "Toy Story")]
        rows += [[f"u{u}", IDS["Heat"], 4.0] for u in range(3)]
        cur.executemany("INSERT INTO interactions (user_id, item_id, rating, ts, source) VALUES (?, ?, ?, NULL, 'ml')", rows)
    return ws


@pytest.fixture()
def ws(tmp_path):
    w = build_workspace(tmp_path / "ws.duckdb")
    yield w
    w.close()


@pytest.fixture()
def stub():
    with OpenAIStubServer(reply=StubTeacherReply()) as server:
        yield server


def make_teacher(stub: OpenAIStubServer, cache, **kw) -> Teacher:
    cfg = dict(timeout=5.0, max_attempts=2, backoff_base=0.01, backoff_max=0.05, concurrency=4)
    cfg.update(kw)
    return Teacher(TeacherConfig.openai(stub.base_url, "gpt-4o-mini", api_key=KEY, **cfg), cache=cache)


def stored(ws, scorer: str, dataset: str = DATASET):
    return ws.df("SELECT * FROM augmented_labels WHERE dataset = ? AND scorer = ? ORDER BY turn_id, item_id",
                 [dataset, scorer])


def chat_prompts(stub) -> list[dict]:
    return [r.body for r in stub.requests if r.path.endswith("/chat/completions")]


# ---------------------------------------------------------------------------------- prompt and parsing
def test_prompt_is_the_papers_table_18():
    assert prompts.RELEVANCE_PROMPT.startswith("You are provided with a dialogue history between a user and a recommender")
    assert prompts.RELEVANCE_PROMPT.count("{context}") == 1 and prompts.RELEVANCE_PROMPT.count("{rec}") == 1
    paper = Path("/work/shared/papers/beyond_single_labels.txt")
    if paper.exists():
        assert prompts.RELEVANCE_PROMPT in paper.read_text()
    msgs = A.build_scoring_messages(["Hi! What do you like?", "Heist movies {rec} please."],
                                    ["Heat (1995) — crime; robbers", "Ronin (1998)"])
    text = msgs[0]["content"]
    assert "Dialogue history:\n\nRecommender: Hi! What do you like?\nUser: Heist movies {rec} please.\n\n" in text
    assert "recommender's recommendation:\n\n1. Heat (1995) — crime; robbers\n2. Ronin (1998)\n\nGive brief" in text


def test_render_dialogue_speakers_and_length():
    ctx = [f"utterance number {i} " + "word " * 30 for i in range(10)]
    text = A.render_dialogue(ctx, max_turns=6, max_chars=500)
    lines = text.splitlines()
    assert lines[-1].startswith("User: utterance number 9") and lines[-2].startswith("Recommender: utterance number 8")
    assert len(text) <= 500 and len(lines) < 6
    assert A.render_dialogue(["x" * 3000], max_chars=300).startswith("User: …") and len(A.render_dialogue(["x" * 3000], max_chars=300)) <= 300
    assert A.render_dialogue(["", "  ", "only this"]) == "User: only this"


TITLES = ["Heat (1995)", "Ronin (1998)", "The Town (2010)", "1917 (2019)"]


@pytest.mark.parametrize("reply, scores, clipped", [
    ('Heat fits best.\n{"Heat (1995)": 4, "Ronin (1998)": 2.5, "The Town (2010)": 3, "1917 (2019)": 0}',
     {0: 4, 1: 2.5, 2: 3, 3: 0}, set()),
    ('```json\n{"Heat": "3.5", "Ronin": "2/4", "The Town (2010)": "1 out of 4", "1917": "0"}\n```',
     {0: 3.5, 1: 2, 2: 1, 3: 0}, set()),
    ('[{"movie": "Heat (1995)", "score": "4"}, {"title": "Ronin", "relevance": 3}]', {0: 4, 1: 3}, set()),
    ('Scores: [4, 3, 2, 1]', {0: 4, 1: 3, 2: 2, 3: 1}, set()),
    ("{'Heat (1995)': 4, 'Ronin (1998)': 3,}", {0: 4, 1: 3}, set()),                      # python-ish
    ('{"1": 4, "2": 1, "3": 2, "4": 3}', {0: 4, 1: 1, 2: 2, 3: 3}, set()),               # list numbers
    ('Format: {"<movie>": <score>, ...}\nAnswer: {"Heat (1995)": 7, "Ronin (1998)": -2}',
     {0: 4, 1: 0}, {0, 1}),                                                              # clipped
    ('{"scores": {"heat (1995)": 4.0, "the town": 3.9}}', {0: 4, 2: 3.9}, set()),          # wrapper
    ('{"Heat (1995)": 4, "Ronin (1998)": 3.5, "The T', {0: 4, 1: 3.5}, set()),            # cut off
    ("1. Heat (1995): 3.5\n2. Ronin (1998) - 2", {0: 3.5, 1: 2}, set()),                 # lines
    ('The score for the movie "Ronin" is 4. The score for the movie "Alien" is 1.', {1: 4}, set()),  # prose
    ('{"Heat (1995) — crime; thieves": 4, "Ronnin (1998)": 2}', {0: 4, 1: 2}, set()),     # echo, typo
    ('{"Heat (1995)": "n/a", "Ronin (1998)": NaN, "Toy Story (1995)": 4}', {}, set()),    # nothing usable
    ("I cannot score these, sorry.", {}, set()),
])
def test_parse_scores(reply, scores, clipped):
    got = llm_output.parse_scores(reply, TITLES)
    assert got.scores == pytest.approx({k: float(v) for k, v in scores.items()})
    assert got.clipped == clipped
    assert got.missing == set(range(4)) - set(scores)
    assert got.unparsable == (not scores)


def test_score_histogram_and_head():
    hist = A.score_histogram([0, 0.4, 0.5, 3.49, 3.5, 4.0, 4.0, None])
    assert [h["count"] for h in hist] == [2, 1, 0, 0, 0, 0, 1, 3] and hist[-1]["hi"] == 4.0
    assert augment_scoring._head({"a": 10, "b": 5, "c": 5, "d": 1, "e": 1, "z": 0}) == {"a"}
    assert augment_scoring._head({"a": 3, "b": 3, "c": 1, "d": 1, "e": 1}) == {"a", "b"}  # tie at the cut-off


# ---------------------------------------------------------------------------------- retrieval
def test_retrieval_shape_exclusions_and_positives(ws):
    turns, stats = A.load_turns(ws, DATASET)
    assert stats == {"turns_total": 10, "turns_without_context": 1, "turns_without_positives": 1, "turns_used": 9}
    pool = A.load_item_pool(ws)
    assert pool.items_without_text == 1 and TITLE_ONLY[0] not in pool.index and len(pool.item_ids) == 40

    r50 = A.retrieve_candidates(ws, DATASET, top_n=50)
    assert [t.turn_id for t in r50.turns] == [t.turn_id for t in turns]
    for t, got, sims in zip(r50.turns, r50.retrieved, r50.sims):
        assert len(got) == 40 - len(t.mentioned) == len(set(got))   # 50 asked, 40 retrievable
        assert not set(got) & t.mentioned
        assert list(sims) == sorted(sims, reverse=True)
    r5 = A.retrieve_candidates(ws, DATASET, top_n=5)
    assert all(len(got) == 5 for got in r5.retrieved)
    by_id = {t.turn_id: i for i, t in enumerate(r5.turns)}
    heist = r5.retrieved[by_id["d1/2"]]
    assert len({IDS[t] for t in ("Heat", "The Town", "Ocean's Eleven", "Inside Man")} & set(heist)) >= 2, heist
    assert IDS["Super Troopers"] not in r50.retrieved[by_id["d2/4"]]
    assert IDS["The Conjuring"] not in r50.retrieved[by_id["d5/4"]]
    for i, t in enumerate(r5.turns):                     # positives always in the candidate list
        cands = r5.candidates(i)
        assert {c["item_id"] for c in cands if c["positive"]} == set(t.positives)
        assert all(c["rank"] is None for c in cands[5:]) and len(cands) == 5 + len(set(t.positives) - set(r5.retrieved[i]))
        assert not {it for _, it, _ in r5.to_score(i)} & set(t.positives)


def test_test_splits_and_unknown_datasets_are_refused(ws):
    with pytest.raises(A.AugmentError, match="test split"):
        A.augment(ws, "inspired_test", scorer="similarity")
    with pytest.raises(A.AugmentError, match="no dialogue turns"):
        A.augment(ws, "nope", scorer="similarity")
    with pytest.raises(A.AugmentError, match="unknown scorer"):
        A.augment(ws, DATASET, scorer="gpt")
    with pytest.raises(A.AugmentError, match="no approved synthetic queries"):
        A.augment(ws, "synthetic", scorer="similarity")


# ---------------------------------------------------------------------------------- scorers
def test_similarity_scorer_needs_no_llm(ws, stub):
    teacher = make_teacher(stub, ws)
    rep = A.augment(ws, DATASET, scorer="similarity", teacher=teacher, threshold=3.0)
    assert stub.chat_requests == 0 and rep.teacher == {} and rep.teacher_model is None
    rows = stored(ws, "similarity")
    assert len(rows) == rep.labels_kept > 0 and (rows["score"] >= 3.0).all() and (rows["score"] <= 4.0).all()
    lo, hi = rep.similarity_bounds
    prov = json.loads(rows["provenance"].iloc[0])
    assert prov["source"] == "similarity" and prov["bounds"] == [lo, hi] and prov["run"] == rep.run_id
    cos = prov["similarity"]
    assert prov["score"] == pytest.approx(min(4.0, 4 * (cos - lo) / (hi - lo)), abs=2e-3)
    assert rep.pairs_scored == rep.candidates - rep.positives_retrieved
    assert sum(h["count"] for h in rep.histogram) == rep.pairs_scored
    # the turns' own positives and their mentioned items are never stored as augmented labels
    for tid, ctx, rec, ment in GOOD_TURNS:
        got = set(rows.loc[rows["turn_id"] == tid, "item_id"])
        assert not got & (set(rec) | set(ment))


def test_teacher_scorer_parses_filters_and_records_provenance(ws, stub):
    teacher = make_teacher(stub, ws)
    retrieval = A.retrieve_candidates(ws, DATASET, top_n=12)
    rep = A.augment(ws, DATASET, scorer="teacher", teacher=teacher, top_n=12, score_batch=5)
    n_pairs = sum(len(retrieval.to_score(i)) for i in range(len(retrieval.turns)))
    # every candidate asked once in batches of <= 5, the robots dialogue twice (garbage, then retried)
    robots = next(i for i, t in enumerate(retrieval.turns) if t.turn_id == "d9/2")
    n_robot_batches = -(-len(retrieval.to_score(robots)) // 5)
    first_asks = sum(-(-len(retrieval.to_score(i)) // 5) for i in range(len(retrieval.turns)))
    assert stub.chat_requests == first_asks + n_robot_batches == rep.teacher["calls"]
    assert rep.teacher["retried_batches"] == n_robot_batches == rep.teacher["unparsable_replies"]
    assert rep.pairs_scored == n_pairs and rep.pairs_unscored == 0
    bodies = chat_prompts(stub)
    assert not any("response_format" in b for b in bodies)   # an OpenAI endpoint: the paper's free answer
    assert all(b["temperature"] == 0.0 for b in bodies[:first_asks])
    assert sorted(b["temperature"] for b in bodies[first_asks:]) == [0.7] * n_robot_batches
    # positives are labelled, never sent to the teacher; mentioned items never candidates
    for b in bodies:
        prompt = b["messages"][-1]["content"]
        dialogue = dialogue_of(prompt)
        turn = next(t for t in GOOD_TURNS if A.render_dialogue(t[1]) == dialogue)
        listed = {IDS[re.sub(r" \(\d{4}\)$", "", x)] for x in listed_titles(prompt)}
        assert not listed & (set(turn[2]) | set(turn[3]))
    # exactly the pairs the stub scored >= 3.5 (after clipping) are stored, with their scores
    rows = stored(ws, "teacher")
    got = {(r.turn_id, r.item_id): r.score for r in rows.itertuples()}
    want = {}
    for i, t in enumerate(retrieval.turns):
        dialogue = A.render_dialogue(list(t.context))
        for _, it, _ in retrieval.to_score(i):
            title = next(f"{x[1]} ({x[2]})" for x in FILMS if x[0] == it)
            if expected_score(dialogue, title) >= 3.5:
                want[(t.turn_id, it)] = expected_score(dialogue, title)
    assert got == want and len(rows) == rep.labels_kept
    # the out-of-range dialogue (scores 5 and -1) is clipped and flagged
    clipped = rows[rows["turn_id"] == "d10/2"]
    assert len(clipped) and (clipped["score"] == 4.0).all()
    provs = [json.loads(p) for p in rows["provenance"]]
    assert all("clipped" in p.get("flags", []) for p, tid in zip(provs, rows["turn_id"]) if tid == "d10/2")
    assert rep.pairs_clipped >= len(clipped)
    assert all("retried" in p.get("flags", []) for p, tid in zip(provs, rows["turn_id"]) if tid == "d9/2")
    p = provs[0]
    assert p["teacher_model"] == "gpt-4o-mini" and p["teacher_endpoint"] == stub.base_url
    assert p["prompt_hash"] == A.PROMPT_HASH and p["scorer"] == "teacher" and p["source"] == "teacher"
    assert p["encoder"] == rep.encoder and 1 <= p["rank"] <= 12 and p["threshold"] == 3.5
    # coverage, read back from the workspace, matches the report
    cov = A.coverage(ws, DATASET, "teacher")
    for key in ("labels_added", "turns", "distinct_items_before", "distinct_items_after", "labels_per_turn"):
        assert cov[key] == rep.coverage[key]
    assert cov["labels_added"] == len(rows) and cov["turns"] == 9
    assert cov["distinct_items_before"] == len({x for t in GOOD_TURNS for x in t[2]})
    assert cov["distinct_items_after"] == len({x for t in GOOD_TURNS for x in t[2]} | set(rows["item_id"]))
    assert sum(h["count"] for h in cov["histogram_kept"]) == len(rows)
    assert sum(h["count"] for h in cov["histogram_all"]) == n_pairs
    lt = cov["long_tail"]["interactions"]
    head = {IDS["Titanic"], IDS["The Matrix"], IDS["Toy Story"]}
    assert lt["augmented_tail_share"] == pytest.approx(float(np.mean([i not in head for i in rows["item_id"]])))
    assert any("labels added" in line for line in rep.lines())
    # the training set for the two-stage trainer
    ts = A.augmented_training_set(ws, DATASET, "teacher")
    assert len(ts) == rows["turn_id"].nunique()
    ctx, labels = next((c, lab) for c, lab in ts if c[-1].startswith("I want a smart science fiction"))
    assert set(labels) == set(rows.loc[rows["turn_id"] == "d3/2", "item_id"])
    with_gt = A.augmented_training_set(ws, DATASET, "teacher", include_ground_truth=True)
    assert len(with_gt) == 9
    heist = next(lab for c, lab in with_gt if "heist" in c[-1])
    assert heist[0] == IDS["Heat"]


def test_rerun_hits_the_cache_and_replaces_atomically(ws, stub):
    rep1 = A.augment(ws, DATASET, scorer="teacher", teacher=make_teacher(stub, ws), top_n=10)
    calls = stub.chat_requests
    first = stored(ws, "teacher")
    rep2 = A.augment(ws, DATASET, scorer="teacher", teacher=make_teacher(stub, ws), top_n=10)
    assert stub.chat_requests == calls                    # the workspace cache answered everything
    assert rep2.teacher["cached_hits"] == rep2.teacher["calls"] == rep1.teacher["calls"]
    again = stored(ws, "teacher")
    assert again[["turn_id", "item_id", "score"]].equals(first[["turn_id", "item_id", "score"]])
    assert {json.loads(p)["run"] for p in again["provenance"]} == {rep2.run_id}
    assert json.loads(ws.get_meta(f"augment:{DATASET}:teacher"))["run_id"] == rep2.run_id


def test_failed_or_empty_runs_keep_the_previous_labels(ws, stub, monkeypatch):
    A.augment(ws, DATASET, scorer="similarity", threshold=3.0)
    sim = stored(ws, "similarity")
    A.augment(ws, DATASET, scorer="teacher", teacher=make_teacher(stub, ws), top_n=8)
    before = stored(ws, "teacher")
    assert len(before) and len(sim)
    # a run whose teacher calls fail: nothing replaced (top_n 9 asks new, uncached questions)
    stub.behaviour = lambda i, body: Fault.server_error(500)
    with pytest.raises(A.AugmentIncomplete, match="did not complete"):
        A.augment(ws, DATASET, scorer="teacher", teacher=make_teacher(stub, ws, max_attempts=1), top_n=9)
    stub.behaviour = None
    assert stored(ws, "teacher").equals(before) and stored(ws, "similarity").equals(sim)
    # a threshold nobody reaches: a clear error, nothing stored
    with pytest.raises(A.AugmentError, match="0-4 score scale"):
        A.augment(ws, DATASET, scorer="similarity", threshold=4.5)
    with pytest.raises(A.NothingKeptError, match="scored >= 3.5 with the teacher scorer") as exc:
        with OpenAIStubServer(reply=lambda m: json.dumps({t: 1 for t in listed_titles(m[-1]["content"])})) as ones:
            A.augment(ws, DATASET, scorer="teacher", teacher=make_teacher(ones, None), top_n=5)
    assert "Nothing was stored" in str(exc.value) and isinstance(exc.value, CRSError)
    assert stored(ws, "teacher").equals(before)
    # a crash while storing rolls the whole replacement back
    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(ws, "set_meta", boom)
    with pytest.raises(RuntimeError):
        A.augment(ws, DATASET, scorer="similarity", threshold=3.8)
    monkeypatch.undo()
    assert stored(ws, "similarity").equals(sim)
    # a completed run replaces: no stale rows from the earlier one
    rep = A.augment(ws, DATASET, scorer="similarity", threshold=3.8)
    now = stored(ws, "similarity")
    assert len(now) == rep.labels_kept < len(sim) and (now["score"] >= 3.8).all()
    assert {json.loads(p)["run"] for p in now["provenance"]} == {rep.run_id}
    assert stored(ws, "teacher").equals(before)


def test_distilled_scorer_learns_from_teacher_pairs(ws, stub):
    rep = A.augment(ws, DATASET, scorer="distilled", teacher=make_teacher(stub, ws), teacher_pairs=40,
                    threshold=0.0, seed=3, constrained_json=True)   # keep everything: check every prediction
    for body in chat_prompts(stub):   # the answer's schema: exactly the listed titles, numbers
        schema = body["response_format"]["schema"]
        assert body["response_format"]["type"] == "json_object"
        assert schema["required"] == listed_titles(body["messages"][-1]["content"]) == list(schema["properties"])
    d = rep.distilled
    # 8 turns x 5 candidates scored by the teacher (one call each, the robots turn retried if drawn)
    assert d["teacher_pairs"] == 40 and d["turns"] == 8
    assert rep.teacher["calls"] == 8 + rep.teacher["retried_batches"]
    a = d["agreement"]
    assert len(d["heldout_turns"]) == 2 and a["n"] == 10 and a["n_train"] == 30
    for key in ("pearson", "spearman", "mae", "threshold_accuracy", "majority_accuracy", "mean_baseline_mae"):
        assert key in a
    assert 0.0 <= a["threshold_accuracy"] <= 1.0 and a["mae"] >= 0
    rows = stored(ws, "distilled")
    provs = [json.loads(p) for p in rows["provenance"]]
    sources = Counter(p["source"] for p in provs)
    assert len(rows) == rep.pairs_scored == rep.candidates - rep.positives_retrieved
    assert sources == {"teacher": 40, "distilled": len(rows) - 40}
    assert (rows["score"] >= 0.0).all() and (rows["score"] <= 4.0).all() and rows["score"].nunique() > 10
    assert all(p["distilled_model"].startswith("ridge") for p in provs if p["source"] == "distilled")
    # the head itself: predictions stay on the 0-4 scale, even far outside the training data
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=(30, 8)), rng.normal(size=(30, 8))
    model = A.DistilledScorer("ridge").fit(u, v, rng.uniform(0, 4, 30))
    pred = model.predict(50 * rng.normal(size=(20, 8)), 50 * rng.normal(size=(20, 8)))
    assert pred.min() >= 0.0 and pred.max() <= 4.0
    assert A.DistilledScorer("mlp").fit(u, v, rng.uniform(0, 4, 30)).predict(u, v).max() <= 4.0
    agree = A.agreement([0, 1, 4, 4], [0.5, 1, 3.6, 3.0], 3.5, train_scores=[2, 2])
    assert agree["threshold_accuracy"] == 0.75 and agree["mae"] == pytest.approx(0.475)


def test_quality_warnings():
    rep = A.AugmentReport(DATASET, "distilled", "r", 3.5, 50, "minilm")
    assert A.quality_warnings(rep) == []
    # what SmolLM2-135M did on INSPIRED: scores by list position, often above 4
    rep.teacher = {"pairs_asked": 300, "pairs_clipped": 114, "pairs_unscored": 0}
    rep.distilled = {"agreement": {"n": 60, "spearman": -0.1, "mae": 0.91, "mean_baseline_mae": 0.80}}
    warnings = A.quality_warnings(rep)
    assert len(warnings) == 2 and "outside 0-4 for 114 of 300" in warnings[0] and "close to noise" in warnings[1]
    rep.warnings = warnings
    assert sum(line.startswith("WARNING") for line in rep.lines()) == 2
    rep.distilled = {"agreement": {"n": 60, "spearman": 0.7, "mae": 0.5, "mean_baseline_mae": 0.9}}
    rep.teacher = {"pairs_asked": 300, "pairs_clipped": 3, "pairs_unscored": 90}
    assert A.quality_warnings(rep) == ["the teacher gave no readable score for 90 of 300 pairs"]


def test_synthetic_dialogues(ws):
    with ws.transaction() as cur:
        for qid, status, query, gt in [
            ("q1", "approved", "I want a heist thriller with a bank robbery crew", ["Heat", "Ronin"]),
            ("q2", "pending", "A sad love story on a ship", ["Titanic"]),
            ("q3", "rejected", "Something with space astronauts", ["Gravity"]),
        ]:
            cur.execute("INSERT INTO synthetic_queries (query_id, query, status) VALUES (?, ?, ?)", [qid, query, status])
            cur.executemany("INSERT INTO ground_truth (query_id, rank, title_raw, item_id, flagged) VALUES (?, ?, ?, ?, FALSE)",
                            [(qid, r, t, IDS[t]) for r, t in enumerate(gt, 1)])
            cur.execute("INSERT INTO ground_truth (query_id, rank, title_raw, item_id, flagged) VALUES (?, 9, 'Nope', NULL, TRUE)", [qid])
    turns, _ = A.load_turns(ws, "synthetic")
    assert [(t.turn_id, t.context, t.positives) for t in turns] == [
        ("q1", ("I want a heist thriller with a bank robbery crew",), (IDS["Heat"], IDS["Ronin"]))]
    assert [t.turn_id for t in A.load_turns(ws, "synthetic:all")[0]] == ["q1", "q2"]
    rep = A.augment(ws, "synthetic:all", scorer="similarity", threshold=3.0, top_n=10)
    rows = stored(ws, "similarity", "synthetic:all")
    assert set(rows["turn_id"]) <= {"q1", "q2"} and rep.turns["turns_used"] == 2
    assert not set(rows.loc[rows["turn_id"] == "q1", "item_id"]) & {IDS["Heat"], IDS["Ronin"]}
    assert A.render_dialogue(list(turns[0].context)) == "User: I want a heist thriller with a bank robbery crew"


def test_cli_entry(ws, capsys):
    parser = A.configure_cli_parser(argparse.ArgumentParser())
    args = parser.parse_args([DATASET, "--scorer", "similarity", "--threshold", "3.2", "--top-n", "20"])
    assert A.run_cli(ws, args) == 0
    out = capsys.readouterr().out
    assert "labels added" in out and "long-tail share" in out and "score histogram" in out
    assert A.run_cli(ws, parser.parse_args([DATASET, "--scorer", "similarity", "--coverage", "--json"])) == 0
    cov = json.loads(capsys.readouterr().out)
    assert cov["labels_added"] == len(stored(ws, "similarity"))


# ---------------------------------------------------------------------------------- training inputs
def test_augmented_examples_feed_training_real_labels_first(ws):
    with pytest.raises(A.AugmentError, match="no augmented labels stored for 'inspired_train'; run"):
        A.augmented_examples(ws, DATASET)
    A.augment(ws, DATASET, scorer="similarity", threshold=3.0)
    rows, scorer = A.augmented_examples(ws, DATASET)
    assert scorer == "similarity" and A.stored_scorers(ws, DATASET) == ["similarity"]
    by_ctx = {tuple(r["context"]): r["labels"] for r in rows}
    matched = 0
    for tid, ctx, rec, ment in GOOD_TURNS:
        real = [i for i in rec if i not in ment]
        key = tuple(" ".join(u.split()) for u in ctx if u.strip())
        if key not in by_ctx:  # a turn left without usable labels
            continue
        matched += 1
        labels = by_ctx[key]
        assert labels[: len(real)] == real  # real labels first, then the augmented ones
        assert set(labels[len(real):]) == set(stored(ws, "similarity").query("turn_id == @tid")["item_id"])
    assert matched >= len(GOOD_TURNS) - 2 and len(rows) == matched
    with ws.transaction() as cur:  # a second scorer's labels: the caller must choose
        cur.execute("INSERT INTO augmented_labels VALUES (?, 'd1/2', ?, 4.0, 'teacher', '{}')", [DATASET, IDS["Ronin"]])
    with pytest.raises(A.AugmentError, match=r"several scorers \(teacher, similarity\)"):
        A.augmented_examples(ws, DATASET)
    assert A.augmented_examples(ws, DATASET, "teacher")[1] == "teacher"


def test_cli_train_with_augmented_labels(tmp_path, monkeypatch, capsys):
    """`augment` then `train --labels mixed|two_stage` through the real CLI and real jobs;
    missing augmented labels and a negative alpha are refused before any job exists."""
    from crs_core import cli, jobs

    path = tmp_path / "ws.duckdb"
    build_workspace(path).close()
    monkeypatch.setenv("CRS_JOBS_ROOT", str(tmp_path / "jobs"))
    base = ["--workspace", str(path)]
    assert cli.main(base + ["train", "--labels", "two_stage", "--alpha", "0.5", "--data", DATASET]) == 1
    assert "no augmented labels stored for 'inspired_train'" in capsys.readouterr().err
    assert cli.main(base + ["train", "--labels", "two_stage", "--alpha", "-1", "--data", DATASET]) == 1
    assert "alpha must be a finite number >= 0" in capsys.readouterr().err
    assert not (tmp_path / "jobs").exists()

    assert cli.main(base + ["augment", "--dataset", DATASET, "--scorer", "similarity", "--threshold", "3.0"]) == 0
    assert "labels added" in capsys.readouterr().out
    launched = []
    for labels in (["--labels", "mixed"], ["--labels", "two_stage", "--alpha", "0.5"]):
        assert cli.main(base + ["train", *labels, "--data", DATASET, "--max-steps", "1"]) == 0
        out = capsys.readouterr().out
        assert "augmented turns from inspired_train:similarity" in out
        assert "skipped 1 turn(s) without any context" in out  # flagged, not trained on
        launched.append(out.split("launched job ")[1].split()[0])
    with Workspace(path) as w:
        for job_id, mode in zip(launched, ("mixed", "two_stage")):
            st = jobs.wait_for_job(jobs.job_folder(w, job_id), timeout=600)
            assert st.state == "succeeded", jobs.read_log(st.folder)
            assert st.result["labels"] == mode and st.config["augmentation"] == "inspired_train:similarity"
            assert (st.folder / "inputs").is_dir()
        assert st.result["alpha"] == 0.5 and st.result["steps"] == 2 and (st.folder / "stage1").is_dir()


def test_augmentation_page_shows_the_run_and_launches_two_stage_training(tmp_path, monkeypatch):
    """The Augmentation page (a thin view over this module) through AppTest: coverage, histogram,
    examples, and the form that launches the two-stage job."""
    from streamlit.testing.v1 import AppTest

    from crs_core import jobs

    path = tmp_path / "ws.duckdb"
    with build_workspace(path) as w:
        A.augment(w, DATASET, scorer="similarity", threshold=3.0)
        n_labels = len(stored(w, "similarity"))
    monkeypatch.setenv("CRS_WORKSPACE", str(path))
    monkeypatch.setenv("CRS_JOBS_ROOT", str(tmp_path / "jobs"))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.switch_page("pages/augmentation.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Labels added"] == f"{n_labels:,}"
    assert [s.value for s in at.subheader] == ["Coverage", "Score histograms", "Examples", "Train with these labels"]
    assert at.dataframe  # the examples' augmented labels with their scores

    at.selectbox(key="aug_mode").set_value("two_stage")
    at.number_input(key="aug_alpha").set_value(0.5)
    at.number_input(key="aug_max_steps").set_value(1)
    at.button(key="aug_launch").click()
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    (msg,) = [s.value for s in at.success]
    assert "augmented turns (inspired_train:similarity)" in msg and "1 turns without context skipped" in msg
    job_id = msg.split("Started job ")[1].split(":")[0]
    with Workspace(path) as w:
        folder = jobs.job_folder(w, job_id)
        assert jobs.job_state(folder).config["labels"] == "two_stage"
        assert jobs.job_state(folder).config["alpha"] == 0.5
        jobs.cancel_job(folder, grace_seconds=60, wait=True)
