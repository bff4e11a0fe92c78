"""Frozen pretrained feature networks, NHWC: the VGG16 trunk of LPIPS (``vgg``), ConvNeXt
(``convnext``, TiTok's perceptual term), pytorch-fid's InceptionV3 (``inception``), the
Inception-I3D of FVD (``i3d``, clips NTHWC), and the reader of their converted param files
(``files``). They are never trained; losses and evaluation use them.
Floor: below ``losses`` / ``evaluation`` / ``models``, above ``nn``; they import ``nn`` and
``titok_jax.trees`` only.
"""
