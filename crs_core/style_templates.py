"""Style templates: short example requests that set the tone and form of synthetic queries.

The active-synthesis query prompt shows the teacher five "Sample Queries" and asks it to turn
reviews into one query "with a similar style". The templates are written for this project
(never copied from ReDial / INSPIRED dialogues, whose test sets we evaluate on) and live in
``data/style_templates.json``, editable by hand or from the studio::

    {"version": 1, "note": "...", "templates": ["What should I watch tonight with my kids?", ...]}

``load_templates`` / ``save_templates`` / ``validate_templates`` are the whole API; a missing
file falls back to ``BUILTIN_TEMPLATES`` (the same list the file ships with).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable

from .errors import CRSError
from .store import PROJECT_ROOT

DEFAULT_PATH = PROJECT_ROOT / "data" / "style_templates.json"
FORMAT_VERSION = 1
MIN_CHARS = 8
MAX_CHARS = 300
MIN_TEMPLATES = 1
SAMPLE_SIZE = 5  # the paper samples five templates per item

# Written for this project: varied length, register, and kind of request (mood, company,
# comparison, constraints, first-person taste, negatives), nearly all in the first person (a
# user asking, never an assistant answering: the teacher copies the voice of its examples). No
# titles, so the teacher does not copy a film name from the style example into the query.
BUILTIN_TEMPLATES: list[str] = [
    "What should I watch tonight with my kids?",
    "I'm looking for something like a classic heist movie, but darker and more serious.",
    "I loved how tense and claustrophobic my last thriller was. Anything else that keeps me on the edge of my seat?",
    "I need a feel-good comedy for a rainy Sunday afternoon. Any ideas?",
    "I want a movie with great dialogue and characters who actually talk like people.",
    "I'd like a slow-burn horror film that doesn't rely on jump scares.",
    "My partner likes romance and I like action. What could we both enjoy?",
    "I'm in the mood for something visually stunning, even if the story is a bit thin.",
    "Recommend me a film with a twist ending that I won't see coming.",
    "I'm after a war movie that focuses on the people rather than the battles.",
    "I need something light and funny after a long week, nothing too long please.",
    "I want an animated movie that I'll enjoy as much as my nephews do.",
    "I enjoy stories about underdogs who win against all odds. Suggestions?",
    "Looking for a mystery where I can try to solve the case along with the detective.",
    "I hated how predictable the last action movie I saw was. Can you find me one that surprises me?",
    "I'd love a sci-fi film that makes me think about big questions instead of just showing explosions.",
    "What's a good movie to watch with my grandparents that isn't boring?",
    "I like musicals, but only when the songs actually move the story forward.",
    "I'm craving a quiet, character-driven drama about family.",
    "Can you point me to an old black-and-white film that still holds up today? I've never seen one.",
    "I'm looking for a sports movie that's about more than just winning the big game.",
    "Give me something scary but not too gory for a Halloween party with friends.",
    "I want to cry a little tonight. What's a beautiful, sad movie?",
    "I'd like a smart, fast-paced crime movie with a great cast.",
    "I want something with strong female leads and a good sense of humor, please.",
    "I usually don't like westerns. Is there one that might change my mind?",
    "We're planning a movie night and want a road-trip film with a lot of heart.",
    "I just finished a gritty detective series and want a film with the same moody atmosphere.",
    "I want a movie whose soundtrack I'll keep listening to afterwards.",
    "I have a long weekend free, so recommend me a fantasy adventure with epic world-building.",
    "I'd like a documentary-style film based on a true story, something that feels real.",
    "Is there a romantic comedy that isn't cheesy? I'm tired of the usual ones.",
]


class TemplateError(CRSError):
    """The style templates cannot be read or are not usable; names the file and the problem."""


def _clean_one(text: Any) -> str:
    if isinstance(text, dict):  # {"text": "..."} entries are accepted too
        text = text.get("text", "")
    if not isinstance(text, str):
        raise TemplateError(f"a template must be a string, not {type(text).__name__}: {text!r}")
    return re.sub(r"\s+", " ", text).strip()


def validate_templates(templates: Iterable[Any], *, where: str = "style templates") -> list[str]:
    """Cleaned templates (whitespace collapsed, exact duplicates dropped, order kept).

    Raises TemplateError naming every problem: too short / too long entries, too few
    templates, or entries that contain prompt delimiters (``<review>``) or template fields
    (``{...}``) that would break the query prompt.
    """
    if isinstance(templates, (str, bytes)):
        raise TemplateError(f"{where}: expected a list of templates, got one string")
    out: list[str] = []
    seen: set[str] = set()
    problems: list[str] = []
    for n, raw in enumerate(templates, 1):
        try:
            text = _clean_one(raw)
        except TemplateError as exc:
            problems.append(f"#{n}: {exc}")
            continue
        if not text:
            continue  # blank lines in an edited list are simply dropped
        if len(text) < MIN_CHARS:
            problems.append(f"#{n} is too short ({len(text)} characters; at least {MIN_CHARS}): {text!r}")
        elif len(text) > MAX_CHARS:
            problems.append(f"#{n} is too long ({len(text)} characters; at most {MAX_CHARS}): {text[:60]!r}...")
        elif re.search(r"</?\s*review\b", text, re.I) or re.search(r"\{[^{}]*\}", text):
            problems.append(f"#{n} contains '<review>' or '{{...}}', which the query prompt uses: {text!r}")
        key = text.casefold()
        if key in seen:
            continue
        seen.add(key)
        out.append(text)
    if problems:
        raise TemplateError(f"{where}: " + "; ".join(problems))
    if len(out) < MIN_TEMPLATES:
        raise TemplateError(f"{where}: no templates; write at least one example request")
    return out


def load_templates(path: str | os.PathLike | None = None) -> list[str]:
    """The templates in ``path`` (default data/style_templates.json), validated.

    A missing default file gives ``BUILTIN_TEMPLATES``; a missing explicit path is an error.
    Accepted shapes: ``{"templates": [...]}`` or a bare list; entries are strings or
    ``{"text": ...}`` objects.
    """
    p = Path(path) if path is not None else DEFAULT_PATH
    if not p.exists():
        if path is None:
            return list(BUILTIN_TEMPLATES)
        raise TemplateError(f"{p}: no such style-template file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TemplateError(f"{p}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    except OSError as exc:
        raise TemplateError(f"{p}: cannot be read: {exc}") from exc
    if isinstance(data, dict):
        if "templates" not in data:
            raise TemplateError(f"{p}: expected a 'templates' list")
        data = data["templates"]
    if not isinstance(data, list):
        raise TemplateError(f"{p}: expected a list of templates")
    return validate_templates(data, where=str(p))


def save_templates(templates: Iterable[Any], path: str | os.PathLike | None = None) -> list[str]:
    """Validate and write the templates atomically (a crash leaves the old file); returns them."""
    clean = validate_templates(templates)
    p = Path(path) if path is not None else DEFAULT_PATH
    p.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "version": FORMAT_VERSION,
        "note": ("Style examples for the synthetic-query prompt (5 are sampled per item). Written for "
                 "this project; do not paste dialogues from ReDial / INSPIRED (evaluation data)."),
        "templates": clean,
    }
    fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".tmp", dir=str(p.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2, ensure_ascii=False)
            fh.write("\n")
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return clean

