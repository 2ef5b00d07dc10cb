"""Serving the user-conditioned LM: `user_context` in Feast, and answers from the online store.

publish_context   a conditioner version's user_context.parquet (every user's k latents) ->
                  Feast `user_context_{blue,green}`, with the embeddings' cut-over guarantees;
                  only a version trained on the production encoder is served, so the latents
                  describe users the way the served embeddings do
PersonalLM        the Python API for serving code: a user's latents read from the online store
                  (plain Feast online reads of the served slot), the conditioner version that
                  wrote them, and the LM -> a greedy answer to a question about that user;
                  `userlens ask` is its command line

    >>> lm = PersonalLM(Project("."), params)
    >>> lm.ask("42", "Which kind of film would this user enjoy tonight?").text
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from userlens.config import Params, UserLLMParams
from userlens.errors import ServingError, UserlensError
from userlens.io import read_json
from userlens.llm.pipeline import CONDITIONER, CONTEXT, MANIFEST, get_version
from userlens.project import Project

NO_REPEAT_NGRAM = 3  # answers: no repeated 3-grams (trained on one-answer targets, greedy SmolLM2 loops)


def _layout(project: Project, params: Params):
    from userlens.feature_sets import CONTEXT as CONTEXT_SET
    from userlens.feature_store import Layout

    return Layout.of(project.root / params.serving.repo, CONTEXT_SET)


def not_servable(project: Project, encoder_version: str) -> str | None:
    """Why latents from this encoder version cannot be served (None: they can)."""
    from userlens.registry import Registry

    production = Registry(project).production()
    if production is None:
        return "nothing is in production yet: user_context is served beside the production embeddings"
    if encoder_version != production.version:
        return (f"the conditioned LM reads encoder {encoder_version}, but production is {production.version}: "
                "train it (`userlens condition`) on the production encoder")  # fmt: skip
    return None


def skip_reason(project: Project, version: str | None = None) -> str | None:
    """Why the conditioner version (the latest by default) cannot be served now (None: it can)."""
    try:
        manifest = read_json(get_version(project, version) / MANIFEST)
    except UserlensError as exc:
        return str(exc)
    return not_servable(project, manifest["encoder"])


def publish_context(project: Project, params: Params, version: str | None = None, progress: bool = False) -> dict:
    """Serve a conditioner version's latents (the latest by default): standby slot, check, cut-over."""
    from userlens.feature_sets import CONTEXT as CONTEXT_SET
    from userlens.feature_sets import version_table
    from userlens.feature_store import publish_set

    if reason := skip_reason(project, version):
        raise UserlensError(f"user_context not published: {reason}")
    export = get_version(project, version) / CONTEXT
    return publish_set(_layout(project, params), params.serving, lambda at: version_table(export, CONTEXT_SET, at),
                       source=str(export), progress=progress)  # fmt: skip


def served_context(project: Project, params: Params) -> dict | None:
    """The user_context serving pointer (None when none is served)."""
    from userlens.feature_store import read_pointer

    return read_pointer(_layout(project, params))


@dataclass(frozen=True)
class Answer:
    user_id: str
    question: str
    text: str
    version: str  # the conditioned-LM version whose latents and parts answered


class PersonalLM:
    """Answers questions about served users with the user-conditioned LM.

    The user's latents come from the online store (the served `user_context` version); the
    trained parts and the LM are loaded once per served version, so a publish is picked up
    without a restart. An unknown user is an error, not a fallback: an answer about the
    population mean would read as an answer about the user."""

    def __init__(self, project: Project, params: Params, device: str | None = None):
        from userlens.feature_sets import CONTEXT as CONTEXT_SET
        from userlens.serving import UserEmbeddings

        self.project, self.params = project, params
        self.device = device or params.user_llm.llm.device
        self.reader = UserEmbeddings(project.root / params.serving.repo, "none", params.serving, CONTEXT_SET)
        self._loaded: tuple[str, Any, Any] | None = None  # (version, model, tokenizer)

    def ask(self, user_id: str, question: str, max_new_tokens: int = 48) -> Answer:
        import torch

        from userlens.llm.tasks import chat_prompt

        vector, found, version = self.reader.get_one(str(user_id))
        if not found:
            raise ServingError(f"user {user_id!r} has no user_context in the online store (served version "
                               f"{version}): unknown user, or one the version was not trained with")  # fmt: skip
        model, tokenizer = self._model(version)
        latents = torch.from_numpy(vector).reshape(1, model.settings.latents, -1).to(model.device)
        encoded = tokenizer(chat_prompt(tokenizer, question), return_tensors="pt", add_special_tokens=False)
        new = model.generate(encoded["input_ids"].to(model.device), encoded["attention_mask"].to(model.device),
                             latents, max_new_tokens, NO_REPEAT_NGRAM)  # fmt: skip
        text = tokenizer.decode(new[0], skip_special_tokens=True).strip()
        return Answer(str(user_id), question, text, version)

    def _model(self, version: str):
        """The conditioned LM of this served version, without its encoder (the latents are served)."""
        if self._loaded is not None and self._loaded[0] == version:
            return self._loaded[1:]
        import torch

        from userlens.llm.conditioning import UserConditionedLM
        from userlens.llm.loader import load_private

        folder = get_version(self.project, version)
        manifest = read_json(folder / MANIFEST)
        settings = UserLLMParams.model_validate(manifest["settings"])
        language_model = load_private(settings.llm.model, self.device)
        if language_model.identity != manifest["language_model"]:
            raise ServingError(f"conditioned LM {version} was trained on {manifest['language_model']}, but "
                               f"{settings.llm.model!r} is now {language_model.identity}")  # fmt: skip
        model = UserConditionedLM(language_model.model, None, settings, user_dim=manifest["user_dim"])
        state = torch.load(folder / CONDITIONER, map_location="cpu", weights_only=True)["model"]
        model.load_state_dict({name: value for name, value in state.items() if not name.startswith("encoder.")})
        model.to(language_model.device).eval()
        self._loaded = (version, model, language_model.tokenizer)
        return model, language_model.tokenizer
