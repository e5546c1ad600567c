from .pipeline import Pipeline  # noqa: F401
