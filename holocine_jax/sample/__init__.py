"""Sampling (DESIGN §11): flow schedulers, the guided multi-expert loop, films on disk."""
from holocine_jax.sample.output import contact_sheet, write_film
from holocine_jax.sample.run import FilmRequest, read_prompt_file, run_sample
from holocine_jax.sample.sampler import sample_film
from holocine_jax.sample.schedulers import make_scheduler

__all__ = ["FilmRequest", "contact_sheet", "make_scheduler", "read_prompt_file", "run_sample",
           "sample_film", "write_film"]
