"""Language models in userlens: loading a causal LM offline (`loader`), used by the lifelong
interest summaries (userlens.lifelong), and the user-conditioned LM (conditioning, tasks,
training, pipeline: `userlens condition`)."""

from userlens.llm.loader import LanguageModel, load_language_model

__all__ = ["LanguageModel", "load_language_model"]
