"""ml_collections configs by name: `tiny`, `wan21_t2v_1_3b`, `wan21_t2v_14b`, `wan22_t2v_a14b`,
`wan22_ti2v_5b`. Each module has `get_config() -> ConfigDict`; load them through
`holocine_jax.config.load_config(name_or_path, overrides)`."""
