"""Teacher providers: one module per kind of endpoint (the contract is `base.Provider`) and the
registry `PROVIDERS` that TeacherConfig, the Synthesis page and the CLI read their names from.

A new provider is a module here with a `Provider` subclass, plus its line in `PROVIDERS`.
"""

from __future__ import annotations

from ..errors import TeacherSetupError
from .base import Provider
from .local_llama import LocalLlama
from .openai_compatible import NO_KEY, OpenAICompatible

__all__ = ["PROVIDERS", "Provider", "OpenAICompatible", "LocalLlama", "NO_KEY", "provider_class", "provider_labels"]

# name -> class; the order is the order the pages offer them in
PROVIDERS: dict[str, type[Provider]] = {cls.name: cls for cls in (
    OpenAICompatible,
    LocalLlama,
)}


def provider_class(name: str) -> type[Provider]:
    try:
        return PROVIDERS[name]
    except KeyError:
        raise TeacherSetupError(f"unknown teacher provider {name!r}; use one of {', '.join(PROVIDERS)}") from None


def provider_labels() -> dict[str, str]:
    return {name: cls.label for name, cls in PROVIDERS.items()}
