"""The registry of selection strategies: what each one scores with and which feature blocks it
reads. `select.select`, `selections.run_selection`, budget curves, the CLI's `--strategy` /
`--strategies` choices and the Selection and Evaluation pages all read it, so adding a strategy
is one `register(Strategy(...))` line (and, for a new scoring rule, its engine in select_engines.py
dispatched from `select.select`).

Engines (arXiv 2504.15476, §3.2; exact formulas in select.py):
- ``random``: a seeded uniform permutation;
- ``js``: entropy of the K-means cluster distribution + λ · JS divergence to the picks so far
  (needs K-means centres of the same features);
- ``fisher``: log(1 + xᵀ Λ⁻¹ x) with Λ updated by Sherman-Morrison after each pick.

Feature blocks: ``review`` (the review / item embedding), ``metadata`` (an embedding of the
item's metadata text) and ``user`` (collaborative factors from the interactions), concatenated
with the weights of `select.build_features`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Strategy", "ENGINES", "BLOCKS", "register", "get", "names", "labels", "with_block", "help_text"]

ENGINES = ("random", "js", "fisher")
BLOCKS = ("review", "metadata", "user")


@dataclass(frozen=True)
class Strategy:
    name: str                   # upper case, as stored with a selection and typed in the CLI
    label: str                  # what pages show
    engine: str                 # one of ENGINES
    blocks: tuple[str, ...] = ("review",)
    help: str = ""

    @property
    def needs_centres(self) -> bool:
        return self.engine == "js"

    @property
    def uses_metadata(self) -> bool:
        return "metadata" in self.blocks

    @property
    def uses_users(self) -> bool:
        return "user" in self.blocks


_STRATEGIES: dict[str, Strategy] = {}


def register(entry: Strategy) -> Strategy:
    if entry.name != entry.name.upper():
        raise ValueError(f"strategy names are upper case: {entry.name!r}")
    if entry.engine not in ENGINES:
        raise ValueError(f"unknown engine {entry.engine!r}; one of {', '.join(ENGINES)}")
    if "review" not in entry.blocks or any(b not in BLOCKS for b in entry.blocks):
        raise ValueError(f"blocks must include 'review' and come from {BLOCKS}, got {entry.blocks}")
    if entry.uses_users and not entry.uses_metadata:
        raise ValueError("the user block comes with the metadata block (select.build_features)")
    _STRATEGIES[entry.name] = entry
    return entry


def get(name: str) -> Strategy:
    try:
        return _STRATEGIES[str(name).upper()]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; valid strategies: {', '.join(_STRATEGIES)}") from None


def names() -> tuple[str, ...]:
    return tuple(_STRATEGIES)


def labels() -> dict[str, str]:
    return {s.name: s.label for s in _STRATEGIES.values()}


def with_block(block: str) -> tuple[str, ...]:
    """The strategies that read a feature block (for messages that name them)."""
    return tuple(s.name for s in _STRATEGIES.values() if block in s.blocks)


def help_text() -> str:
    """One line per strategy, its label and what it prefers (the pages' help on the choice)."""
    return "\n\n".join(f"**{s.label}**" + (f": {s.help}" if s.help else "") for s in _STRATEGIES.values())


register(Strategy("RANDOM_UNIFORM", "Random (uniform)", "random", help="A seeded uniform sample: the baseline."))
register(Strategy("JS", "Jensen-Shannon (JS)", "js",
                  help="Reviews whose cluster membership is uncertain and unlike the picks so far."))
register(Strategy("FISHER", "Fisher information", "fisher",
                  help="Reviews that add new directions to the embedding space."))
register(Strategy("METADATA_JS", "JS + item metadata", "js", ("review", "metadata"),
                  help="JS over the review and the item's text (title, year, genres, plot, cast)."))
register(Strategy("METADATA_FISHER", "Fisher + item metadata", "fisher", ("review", "metadata"),
                  help="Fisher over the review and the item's text (title, year, genres, plot, cast)."))
register(Strategy("USER_JS", "JS + metadata + users", "js", ("review", "metadata", "user"),
                  help="JS over the review, the item's text and who rated the item (collaborative factors)."))
register(Strategy("USER_FISHER", "Fisher + metadata + users", "fisher", ("review", "metadata", "user"),
                  help="Fisher over the review, the item's text and who rated the item (collaborative factors)."))
