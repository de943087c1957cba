"""Text handling every engine reuses: chat templates (jinja2, as transformers renders them),
tokenizers (tokenizer.json or GGUF metadata) and incremental detokenizing with stop strings.
Nothing here imports an engine, the runner or the worker."""
