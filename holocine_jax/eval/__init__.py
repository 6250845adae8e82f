"""Evaluation (DESIGN §12): clu film metrics, the synthetic world's attribute reader, the job."""
from holocine_jax.eval.attributes import read_film, read_shot
from holocine_jax.eval.job import evaluate_checkpoint, run_eval
from holocine_jax.eval.metrics import FilmMetrics, film_metrics

__all__ = ["FilmMetrics", "evaluate_checkpoint", "film_metrics", "read_film", "read_shot",
           "run_eval"]
