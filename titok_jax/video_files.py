"""Video files for the video tokenizers' inference commands (``titok-jax reconstruct`` /
``tokenize`` on a video file): read a video into frames, cut it into clips the tokenizer takes,
write the reconstruction as a video file and a frame grid.

Formats: animated GIF with PIL (always), ``.mp4 .webm .mkv .mov .avi .m4v`` with PyAV (the
``video`` extra: ``pip install 'titok_jax[video]'``), in and out.

Clips (:func:`video_clips`): every frame is resized (shorter side, bicubic) and centre-cropped to
the tokenizer's ``image_size`` (the eval transform, as ``api.load_image``), then the video is cut
into consecutive clips of the tokenizer's nominal ``num_frames`` ``T`` (frames past the last whole
clip are dropped); a video shorter than ``T`` is one clip of the longest length ``<= n`` the model
takes (``model.check_frames``), or a ValueError when there is none.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from titok_jax.errors import UserError

GIF_EXTENSIONS = (".gif",)
AV_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")
VIDEO_EXTENSIONS = GIF_EXTENSIONS + AV_EXTENSIONS
DEFAULT_FPS = 10.0
GRID_FRAMES = 16   # frames of the first clip shown in the frame grid


class MissingVideoExtraError(UserError, ImportError):
    """A compressed video needs PyAV, which is not installed."""


def is_video_file(path: str) -> bool:
    return os.fspath(path).lower().endswith(VIDEO_EXTENSIONS)


def _av(path: str) -> Any:
    try:
        import av
    except ImportError:
        raise MissingVideoExtraError(f"{path}: compressed video needs PyAV, which is not installed: "
                                     "pip install 'titok_jax[video]' (or: pip install av); GIF "
                                     "works without it") from None
    return av


def read_video(path: str) -> tuple[np.ndarray, float]:
    """``(frames uint8 [N, H, W, 3] RGB, frames per second)`` of a GIF (PIL) or a compressed video
    (PyAV). A file that cannot be decoded is a one-line ValueError naming it."""
    path = os.fspath(path)
    if not is_video_file(path):
        raise ValueError(f"{path} is not a video file ({', '.join(VIDEO_EXTENSIONS)})")
    try:
        if path.lower().endswith(GIF_EXTENSIONS):
            from PIL import Image
            with Image.open(path) as im:
                duration = float(im.info.get("duration") or 0)
                frames = []
                for i in range(int(getattr(im, "n_frames", 1))):
                    im.seek(i)
                    frames.append(np.asarray(im.convert("RGB")))
            fps = 1000.0 / duration if duration > 0 else DEFAULT_FPS
        else:
            av = _av(path)
            with av.open(path) as container:
                if not container.streams.video:
                    raise ValueError("no video stream")
                stream = container.streams.video[0]
                rate = stream.average_rate or stream.guessed_rate
                fps = float(rate) if rate else DEFAULT_FPS
                frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except (MissingVideoExtraError, FileNotFoundError):
        raise
    except Exception as e:  # PIL / PyAV errors of a corrupt file
        lines = str(e).strip().splitlines()
        raise ValueError(f"cannot read video {path}: {lines[0] if lines else type(e).__name__}") \
            from None
    if not frames:
        raise ValueError(f"cannot read video {path}: no frames")
    return np.stack(frames), fps


def write_video(path: str, frames: Any, fps: float = DEFAULT_FPS) -> None:
    """Frames ``[N, H, W, 3]`` (uint8, or float in [0, 1]) -> an animated GIF (looping) or, for
    the PyAV extensions, an H.264 (``.mp4``/``.mkv``/``.mov``/``.m4v``) or VP9 (``.webm``) video."""
    from titok_jax.evaluation.images import to_uint8
    path = os.fspath(path)
    arr = to_uint8(frames)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.lower().endswith(GIF_EXTENSIONS):
        from PIL import Image
        images = [Image.fromarray(f) for f in arr]
        images[0].save(path, format="GIF", save_all=True, append_images=images[1:], loop=0,
                       duration=max(1, int(round(1000.0 / max(fps, 1e-3)))))
        return
    if not path.lower().endswith(AV_EXTENSIONS):
        raise ValueError(f"{path}: write a video as {', '.join(VIDEO_EXTENSIONS)}")
    av = _av(path)
    from fractions import Fraction
    codec = "libvpx-vp9" if path.lower().endswith(".webm") else "libx264"
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = int(arr.shape[2]) // 2 * 2, int(arr.shape[1]) // 2 * 2
        stream.pix_fmt = "yuv420p"
        for f in arr:
            frame = av.VideoFrame.from_ndarray(
                np.ascontiguousarray(f[:stream.height, :stream.width]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def grid_path(output: str) -> str:
    """Where the frame grid of the video ``output`` goes: ``<output stem>_frames.png``."""
    return os.path.splitext(os.fspath(output))[0] + "_frames.png"


def clip_length(num_frames: int, available: int, check_frames: Callable[[int], None]) -> int:
    """The clip length: ``num_frames`` when the video has that many frames, else the longest
    length ``<= available`` that ``check_frames`` accepts; a ValueError when none is."""
    if available >= num_frames:
        return num_frames
    for t in range(available, 0, -1):
        try:
            check_frames(t)
        except ValueError:
            continue
        return t
    raise ValueError(f"the video has {available} frame(s), fewer than the shortest clip this "
                     f"tokenizer takes")


def video_clips(frames: np.ndarray, image_size: int, num_frames: int,
                check_frames: Callable[[int], None]) -> np.ndarray:
    """uint8 ``[C, T, S, S, 3]``: the video's frames resized and centre-cropped to ``S`` and cut
    into consecutive clips of :func:`clip_length` frames (the tail that fills no clip dropped)."""
    from titok_jax.data.transforms import center_crop, resize_shorter_side
    t = clip_length(num_frames, len(frames), check_frames)
    count = len(frames) // t
    out = np.stack([center_crop(resize_shorter_side(f, image_size), image_size)
                    for f in frames[:count * t]])
    return out.reshape((count, t, image_size, image_size, 3))


def tokenizer_clips(tokenizer: Any, path: str) -> tuple[np.ndarray, float]:
    """``(clips uint8 [C, T, S, S, 3], fps)`` of the video file ``path`` for a video tokenizer."""
    frames, fps = read_video(path)
    return video_clips(frames, tokenizer.image_size, tokenizer.num_frames,
                       tokenizer.model.check_frames), fps


def reconstruct_video(tokenizer: Any, path: str, output: str) -> list[str]:
    """Encode + decode the video file ``path`` clip by clip (:func:`video_clips`); write the
    reconstructed frames to the video ``output`` (its extension picks the format) and the first
    clip's frames (originals over reconstructions) to :func:`grid_path` ``(output)``. Both are
    renamed into place only once all is done (``outputs.staging``); returns the two paths."""
    from titok_jax.evaluation.images import make_grid, save_png
    from titok_jax.outputs import staging
    if not is_video_file(output):
        raise ValueError(f"--output {output}: a video input needs a video output "
                         f"({', '.join(VIDEO_EXTENSIONS)})")
    clips, fps = tokenizer_clips(tokenizer, path)
    rec = tokenizer.reconstruct(clips)
    grid = make_grid(clips[0, :GRID_FRAMES], rec[0, :GRID_FRAMES], ncol=min(GRID_FRAMES,
                                                                           clips.shape[1]))
    outputs = [os.fspath(output), grid_path(output)]
    with staging() as stage:
        write_video(stage.path(outputs[0]), rec.reshape((-1, *rec.shape[2:])), fps)
        save_png(stage.path(outputs[1]), grid)
    return outputs
