"""The `titok-jax` commands, one module per command or small group; each parses its absl flags and
makes one library call. ``titok_jax.cli`` maps command names to them (modules are imported only when
their command runs):

- ``common``: flag parsing, one-line errors, ``run_command`` (exit statuses);
- ``train``: ``train``, ``eval``;
- ``tokenizer``: ``reconstruct``, ``tokenize``, ``features``, ``detokenize``;
- ``generate``: ``generate``;
- ``import_torch``: ``import-torch``;
- ``convert``: ``convert-lpips``, ``convert-convnext``, ``convert-dinov2``, ``convert-clip``, ``convert-inception``, ``convert-i3d``, ``fid-reference``.
"""
