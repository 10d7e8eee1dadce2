"""The offline teacher: a llama.cpp server on 127.0.0.1 (`crs_core.llama_server`) serving the
installed GGUF model (`crs_core.models.local_teacher`), started on first need; it speaks the
OpenAI protocol, so requests go as for any OpenAI-compatible endpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import CRSError
from ..structured import FORMAT_JSON_OBJECT, FORMAT_JSON_SCHEMA, FORMAT_NONE
from .openai_compatible import NO_KEY, OpenAICompatible


class LocalLlama(OpenAICompatible):
    name = "local"
    label = "Local model (offline, llama.cpp)"
    free = True
    default_concurrency = 1  # one model, one request at a time
    structured_candidates = (FORMAT_JSON_OBJECT, FORMAT_JSON_SCHEMA, FORMAT_NONE)  # known to take json_object

    def __init__(self, config: Any, server: Any = None):
        super().__init__(config)
        self.server = server          # a LlamaServer given by the caller is not stopped by close()
        self._owns_server = False
        self._endpoint_id: str | None = None
        self._choice: Any = ...       # models.local_teacher(), asked once

    @staticmethod
    def check_config(config: Any) -> None:
        """Any config will do: without a model path, the installed local teacher."""

    def _local_choice(self) -> Any:
        if self._choice is ...:
            from ...models import ModelAssemblyError, local_teacher

            try:
                self._choice = local_teacher()
            except ModelAssemblyError:
                raise
            except CRSError:
                self._choice = None
        return self._choice

    @property
    def model_name(self) -> str:
        if self.server is not None:
            return self.server.model_alias
        if self.config.model:
            return self.config.model
        if self.config.local_model_path:
            return Path(self.config.local_model_path).stem
        choice = self._local_choice()
        return choice.alias if choice is not None else "?"

    def model_path(self) -> Path | None:
        if self.server is not None:
            return Path(self.server.model_path)
        if self.config.local_model_path:
            return Path(self.config.local_model_path)
        choice = self._local_choice()
        return choice.path if choice is not None else None

    @property
    def endpoint(self) -> str:
        """The model file (name and size): the server's port changes from run to run."""
        if self._endpoint_id is None:
            path = self.model_path()
            size = path.stat().st_size if path is not None and path.exists() else 0
            self._endpoint_id = f"local:{path.name if path is not None else '?'}:{size}"
        return self._endpoint_id

    def load(self) -> None:
        from ...llama_server import LlamaServer

        cfg = self.config
        if self.server is None:
            choice = None if cfg.local_model_path else self._local_choice()  # the model named in cache keys
            self.server = LlamaServer(cfg.local_model_path or (choice.path if choice is not None else None),
                                      n_ctx=cfg.local_n_ctx, n_threads=cfg.local_n_threads,
                                      model_alias=cfg.model or (choice.alias if choice is not None else None))
            self._owns_server = True
        if not self.server.is_running:
            self.server.start()
        self._connect(self.server.base_url, NO_KEY)

    def close(self) -> None:
        super().close()
        if self._owns_server and self.server is not None:
            self.server.stop()
            self.server = None
            self._owns_server = False
