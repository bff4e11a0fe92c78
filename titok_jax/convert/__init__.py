"""PyTorch state dicts -> titok_jax params.

``titok_jax.convert.lpips``: torchvision VGG16 + LPIPS lin weights -> the LPIPS-VGG param file
(``titok-jax convert-lpips --vgg vgg16.pth --lin vgg.pth --output lpips_vgg.safetensors``; likewise
``convert-convnext``, ``convert-dinov2``, ``convert-clip``, ``convert-inception`` and
``convert-i3d``, implemented in
``titok_jax.commands.convert``).

Submodules are not imported here (each pulls in its own networks); import them directly.
"""
