"""Tasks: what the one trainer trains, evaluates and the inference API loads. A task carries a
family's whole life cycle (``tasks/base.py``: ``init``, ``constants``, ``loss``, ``evaluate``,
``batch_keys``; ``encode`` / ``decode`` / ``features`` for tokenizers, ``sample`` / ``logits`` for
generators) and is registered by name; the trainer, the API and the tools look it up through
``get_task`` (or ``runs.restore_run`` for a finished workdir)."""
from titok_jax.tasks.base import (  # noqa: F401
    TASKS, EvalContext, EvalResult, GeneratorSpec, GeneratorTaskBase, Task, TokenizerTaskBase,
    TokenSpec, get_task, register_task)
from titok_jax.tasks import tokenizer  # noqa: F401,E402  (registers "tokenizer")
from titok_jax.tasks import titok_stages  # noqa: F401,E402  (registers "titok_stage1", "titok_stage2")
from titok_jax.tasks import generator  # noqa: F401,E402  (registers "maskgit")
from titok_jax.tasks import ar  # noqa: F401,E402  (registers "ar")
from titok_jax.tasks import flowmo  # noqa: F401,E402  (registers "flowmo")
from titok_jax.tasks import flextok  # noqa: F401,E402  (registers "flextok")
from titok_jax.tasks import extractor  # noqa: F401,E402  (registers "extractor")
from titok_jax.tasks import fqgan  # noqa: F401,E402  (registers "fqgan")
