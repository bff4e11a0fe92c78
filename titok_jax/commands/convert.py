"""The frozen networks' weight files: ``titok-jax convert-lpips``, ``convert-convnext``,
``convert-dinov2``, ``convert-clip`` and ``convert-inception`` (PyTorch weights -> the files the perceptual losses and FID read, by
``titok_jax.convert``), and ``titok-jax fid-reference`` (FID reference statistics of a data split)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from titok_jax.commands.common import UsageError, check_npz_input, parse, require
from titok_jax.outputs import check_new_outputs, define_overwrite, npz_path, replacing

if TYPE_CHECKING:  # numpy loads after the flags are checked
    import numpy as np

OUTPUT_HELP = "the file to write: .safetensors or .npz"


def _convert(name: str, argv: Sequence[str], inputs: dict[str, str],
             run: Callable[[Any, str], Mapping[str, np.ndarray]], note: Callable[[int], str] = lambda n: "",
             optional: Mapping[str, str] | None = None) -> int:
    """Parse ``--<input> ...  --output OUT [--overwrite]`` (``inputs``: flag -> help; ``optional``:
    more string flags that may stay unset), refuse an existing OUT unless --overwrite, call
    ``run(flags, path)`` to write a temporary ``path`` renamed to OUT when complete, and print what
    it wrote."""
    from absl import flags

    def define(fv: Any) -> None:
        for flag, help_text in {**inputs, **(optional or {})}.items():
            flags.DEFINE_string(flag, None, help_text, flag_values=fv)
        flags.DEFINE_string("output", None, OUTPUT_HELP, flag_values=fv)
        define_overwrite(fv)

    fv = parse(f"titok-jax {name}", argv, define)
    require(fv, (*inputs, "output"), name,
            f"{name} " + " ".join(f"--{k} {k.upper()}" for k in inputs) + " --output OUT")
    if not fv.output.endswith((".safetensors", ".npz")):
        raise ValueError(f"{fv.output}: output must end in .safetensors or .npz")
    for flag in inputs:
        check_npz_input(getattr(fv, flag), flag)
    check_new_outputs([fv.output], fv.overwrite)
    try:
        with replacing(fv.output) as tmp:
            flat = run(fv, tmp)
    except ImportError as e:  # a .pth without torch installed: one line, not an internal error
        raise ValueError(str(e)) from None
    import numpy as np
    n = sum(int(np.prod(v.shape)) for v in flat.values())
    print(f"wrote {fv.output}: {len(flat)} tensors, {n:,} params{note(n)}")
    return 0


def convert_lpips(argv: Sequence[str]) -> int:
    """torchvision VGG16 + the LPIPS linear layers -> LPIPS-VGG params (``losses.perceptual``)."""
    def run(fv: Any, out: str) -> Mapping[str, np.ndarray]:
        from titok_jax.convert.lpips import convert_lpips_files
        return convert_lpips_files(fv.vgg, fv.lin, out)

    return _convert("convert-lpips", argv, {
        "vgg": "torchvision VGG16 state dict (.pth, .safetensors or .npz)",
        "lin": "LPIPS lin weights, e.g. the lpips package's weights/v0.1/vgg.pth"},
        run)


def convert_convnext(argv: Sequence[str]) -> int:
    """torchvision ConvNeXt (-S for TiTok's perceptual term) -> ConvNeXt params."""
    def run(fv: Any, out: str) -> Mapping[str, np.ndarray]:
        from titok_jax.convert.convnext import convert_convnext_file
        return convert_convnext_file(fv.input, out)

    return _convert("convert-convnext", argv,
                    {"input": "convnext_small-0c510722.pth (or .safetensors / .npz)"}, run,
                    lambda n: "" if n == 50_223_688 else " (not ConvNeXt-S, whose 50,223,688 TiTok's loss uses)")


def convert_dinov2(argv: Sequence[str]) -> int:
    """Official DINOv2 (``dinov2_vit{s,b,l}14[_reg4]_pretrain.pth``) -> FlexTok's REPA teacher params."""
    def run(fv: Any, out: str) -> Mapping[str, np.ndarray]:
        from titok_jax.convert.dinov2 import convert_dinov2_file, describe
        heads = fv.num_heads
        if heads is not None and not (heads.isdigit() and int(heads) > 0):
            raise UsageError(f"--num_heads must be a positive integer, got {heads!r}")
        flat = convert_dinov2_file(fv.input, out, int(heads) if heads else None)
        msgs.append(describe(flat) + (f", num_heads={heads}" if heads else ""))
        return flat

    msgs: list[str] = []
    return _convert("convert-dinov2", argv,
                    {"input": "dinov2_vit{s,b,l}14[_reg4]_pretrain.pth (or .safetensors / .npz)"}, run,
                    lambda n: f" (repa.teacher.model: {msgs[0]})",
                    optional={"num_heads": "attention heads (default width / 64, as released)"})


def convert_clip(argv: Sequence[str]) -> int:
    """CLIP's visual tower (OpenAI ``ViT-L-14.pt`` or a Hugging Face ``openai/clip-vit-*`` file or
    snapshot) -> FQGAN's CLIP teacher params (``nets.clip.CLIPVisionTower``)."""
    def run(fv: Any, out: str) -> Mapping[str, np.ndarray]:
        from titok_jax.convert.clip import convert_clip_file, describe
        heads = fv.num_heads
        if heads is not None and not (heads.isdigit() and int(heads) > 0):
            raise UsageError(f"--num_heads must be a positive integer, got {heads!r}")
        flat, arch = convert_clip_file(fv.input, out, int(heads) if heads else None)
        msgs.append(describe(arch))
        return flat

    msgs: list[str] = []
    return _convert("convert-clip", argv,
                    {"input": "ViT-L-14.pt (OpenAI), a HF CLIP model.safetensors or snapshot directory"},
                    run, lambda n: f' (teachers.<factor>.model with "arch": "clip": {msgs[0]})',
                    optional={"num_heads": "attention heads (default: config.json, else width / 64)"})


def convert_inception(argv: Sequence[str]) -> int:
    """pytorch-fid's InceptionV3 -> the params of rFID / gFID / Inception Score."""
    def run(fv: Any, out: str) -> Mapping[str, np.ndarray]:
        from titok_jax.convert.inception import convert_inception_file
        return convert_inception_file(fv.input, out)

    return _convert("convert-inception", argv,
                    {"input": "pt_inception-2015-12-05-6726825d.pth (or .safetensors / .npz)"}, run)


def convert_i3d(argv: Sequence[str]) -> int:
    """The PyTorch InceptionI3d (piergiaj layout) -> the params of FVD (``eval.fvd_weights``)."""
    def run(fv: Any, out: str) -> Mapping[str, np.ndarray]:
        from titok_jax.convert.i3d import convert_i3d_file
        return convert_i3d_file(fv.input, out)

    return _convert("convert-i3d", argv,
                    {"input": "i3d_pretrained_400.pt / rgb_imagenet.pt (or .safetensors / .npz)"}, run)

def _fid_reference_flags(fv: Any) -> None:
    from absl import flags
    flags.DEFINE_string("data", None, "data source: sample, folder:PATH or tfds:NAME", flag_values=fv)
    flags.DEFINE_string("split", "eval", "split name", flag_values=fv)
    flags.DEFINE_string("data_dir", None, "TFDS data_dir", flag_values=fv)
    flags.DEFINE_integer("image_size", 256, "centre-crop size", flag_values=fv)
    flags.DEFINE_integer("batch_size", 50, "images per Inception call", flag_values=fv)
    flags.DEFINE_integer("max_images", 0, "0 = the whole split", flag_values=fv)
    flags.DEFINE_string("inception_weights", None, "file from titok-jax convert-inception", flag_values=fv)
    flags.DEFINE_string("output", None, "output .npz (mu, sigma)", flag_values=fv)
    define_overwrite(fv)


def fid_reference(argv: Sequence[str]) -> int:
    """FID reference statistics (``mu``, ``sigma``) of a data split's centre crops, as an ``.npz``
    (what ``eval --fid_reference`` and ``generate --fid_reference`` read)."""
    fv = parse("titok-jax fid-reference", argv, _fid_reference_flags)
    require(fv, ("data", "inception_weights", "output"), "fid-reference",
            "fid-reference --data SOURCE --inception_weights FILE --output ref.npz")
    if fv.image_size < 1 or fv.batch_size < 1 or fv.max_images < 0:
        raise UsageError("--image_size and --batch_size must be >= 1, --max_images >= 0")
    out = npz_path(fv.output)  # np.savez would add the extension
    check_npz_input(fv.inception_weights, "inception_weights")
    check_new_outputs([out], fv.overwrite)
    from titok_jax.data import make_eval_iterator
    from titok_jax.evaluation.fid import save_reference_stats
    from titok_jax.evaluation.fid_reference import reference_stats
    from titok_jax.nets.inception import load_inception_params
    params = load_inception_params(fv.inception_weights)
    batches = make_eval_iterator(fv.data, fv.image_size, fv.batch_size, split=fv.split,
                                 data_dir=fv.data_dir, process_index=0, process_count=1)
    stats = reference_stats(batches, params, fv.max_images)
    mu, sigma = stats.result()
    with replacing(out) as tmp:
        save_reference_stats(tmp, mu, sigma, num_images=stats.n)
    print(f"wrote {out}: mu {mu.shape}, sigma {sigma.shape} from {stats.n} images")
    return 0
