"""Tasks: what the one trainer trains. A task builds its model from the config and provides
``init``, ``grads`` (the loss and its gradients), ``constants`` (frozen inputs such as LPIPS
weights) and ``reconstruct`` (eval outputs). Registered by name; the trainer and the API look them
up through ``get_task``."""
from titok_jax.tasks.base import TASKS, get_task, register_task  # noqa: F401
from titok_jax.tasks import tokenizer  # noqa: F401  (registers "tokenizer")
from titok_jax.tasks import titok_stages  # noqa: F401,E402  (registers "titok_stage1", "titok_stage2")
from titok_jax.tasks import generator  # noqa: F401,E402  (registers "maskgit")
from titok_jax.tasks import ar  # noqa: F401,E402  (registers "ar")
from titok_jax.tasks import flowmo  # noqa: F401,E402  (registers "flowmo")
from titok_jax.tasks import flextok  # noqa: F401,E402  (registers "flextok")
