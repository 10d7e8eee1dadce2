"""Reading what a teacher LLM replies: one JSON extractor and one parser per kind of reply.

- `reply`: the reply as text (code fences, HTML, markdown, list markers) and the JSON in it:
  `json_values(text, lenient=False)`, every JSON array / object in a reply (strict, or also
  near-JSON for scores); `first_json(text)`, a reply that should be JSON; `json_list(value)`, a
  list column as DuckDB / pandas return it.
- `title_lists.parse_title_list`, `queries.parse_query_reply`, `choices.parse_choice_reply`:
  synthesis (Algorithm 2); `scores.parse_scores`: the 0-4 relevance scores of label augmentation.

Parsers never raise on bad text: they return what they could read and a reason for what they
could not (HTML, truncated JSON, prose around it, prompt-injected instructions are all text).
A new kind of reply is one module here, re-exported below.
"""

from .choices import N_GROUND_TRUTH, ChoiceParse, parse_choice_reply
from .queries import QUERY_KEYS, QueryParse, names_title, normalize_query, parse_query_reply
from .reply import first_json, json_list, json_values
from .scores import ParsedScores, normalize_label, parse_scores
from .title_lists import clean_listed_title, description_cut, parse_title_list

__all__ = [
    "json_values", "first_json", "json_list",
    "parse_title_list", "clean_listed_title", "description_cut",
    "QueryParse", "QUERY_KEYS", "parse_query_reply", "names_title", "normalize_query",
    "ChoiceParse", "N_GROUND_TRUTH", "parse_choice_reply",
    "ParsedScores", "normalize_label", "parse_scores",
]
