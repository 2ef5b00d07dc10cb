"""Language models in userlens: loading a causal LM offline (`loader`), used by the lifelong
interest summaries (userlens.lifelong) and, later, by the user-conditioned LM (issue 11)."""

from userlens.llm.loader import LanguageModel, load_language_model

__all__ = ["LanguageModel", "load_language_model"]
