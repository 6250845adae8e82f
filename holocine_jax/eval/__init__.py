"""Evaluation (DESIGN §12): clu film metrics and the eval job (the world's reader: `world/`)."""
from holocine_jax.eval.job import evaluate_checkpoint, run_eval
from holocine_jax.eval.metrics import FilmMetrics, film_metrics

__all__ = ["FilmMetrics", "evaluate_checkpoint", "film_metrics", "run_eval"]
