"""Video files for the video tokenizers' inference commands (``titok-jax reconstruct`` /
``tokenize`` on a video, ``detokenize`` of clip tokens): read a video into frames, cut it into
clips the tokenizer takes, write the reconstruction (or decoded clips) as a video file and a frame
grid.

Formats: animated GIF with PIL (always), ``.mp4 .webm .mkv .mov .avi .m4v`` with PyAV (the
``video`` extra: ``pip install 'titok_jax[video]'``), in and out; and, in, a folder of frame
images (``.jpg .jpeg .png .webp`` directly in it, in natural name order, ``f2`` before ``f10``:
the frame folders of ``video_folder:PATH``), played at ``DEFAULT_FPS``.

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


def has_pyav() -> bool:
    """True when PyAV (the ``video`` extra) is importable."""
    import importlib.util
    return importlib.util.find_spec("av") is not None


def video_name(path: str) -> str:
    """The name a video goes by (``files`` of its tokens): a file's basename, a frame folder's
    name (``frames/`` -> ``frames``; ``.`` -> the current folder's name; ``/`` -> ``video``)."""
    path = os.fspath(path)
    name = os.path.basename(os.path.normpath(os.path.abspath(path) if os.path.isdir(path)
                                             else path))
    return name or "video"   # the root folder


def video_file_name(name: str, pyav: bool) -> str:
    """The video file clip tokens named ``name`` are decoded to: ``name`` itself for a GIF, or for
    a PyAV format when ``pyav``; ``<stem>.gif`` for a PyAV format without it; ``<name>.gif`` for
    any other name (a frame folder's, a row index)."""
    stem, ext = os.path.splitext(name)
    if ext.lower() in GIF_EXTENSIONS or (pyav and ext.lower() in AV_EXTENSIONS):
        return name
    return (stem if ext.lower() in AV_EXTENSIONS else name) + ".gif"


def read_frame_folder(path: str) -> tuple[np.ndarray, float]:
    """``(frames uint8 [N, H, W, 3] RGB, DEFAULT_FPS)`` of a folder of frame images (the files
    directly in it, by extension, natural name order; PIL, as every image file is read). No frame,
    an unreadable frame or frames of different sizes is a one-line ValueError naming the file."""
    from titok_jax.data.sources import IMAGE_EXTENSIONS, decode_image_file
    from titok_jax.data.video_sources import frame_folder_files
    path = os.fspath(path)
    names = frame_folder_files(path)
    if not names:
        raise ValueError(f"{path} holds no frame images ({', '.join(IMAGE_EXTENSIONS)}, directly "
                         f"in it) to read as a video")
    frames: list[np.ndarray] = []
    for name in names:
        file = os.path.join(path, name)
        try:
            frame = decode_image_file(file)
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
            lines = str(e).strip().splitlines()
            why = lines[0] if lines else type(e).__name__
            raise ValueError(f"cannot read frame {file}: {why}") from None
        if frames and frame.shape != frames[0].shape:
            raise ValueError(f"frame {file} is {frame.shape[1]}x{frame.shape[0]}, the frames "
                             f"before it {frames[0].shape[1]}x{frames[0].shape[0]}: a video's "
                             f"frames must have one size")
        frames.append(frame)
    return np.stack(frames), DEFAULT_FPS


def read_video(path: str) -> tuple[np.ndarray, float]:
    """``(frames uint8 [N, H, W, 3] RGB, frames per second)`` of a GIF (PIL), a compressed video
    (PyAV) or a folder of frame images (:func:`read_frame_folder`). A file that cannot be decoded
    is a one-line ValueError naming it."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return read_frame_folder(path)
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
    """``(clips uint8 [C, T, S, S, 3], fps)`` of the video ``path`` (a file or a frame folder) for
    a video tokenizer."""
    frames, fps = read_video(path)
    return video_clips(frames, tokenizer.image_size, tokenizer.num_frames,
                       tokenizer.model.check_frames), fps


def write_clips(stage: Any, output: str, clips: np.ndarray, fps: float,
                originals: np.ndarray | None = None) -> list[str]:
    """Clips ``[C, T, S, S, 3]`` (float in [0, 1] or uint8) concatenated in time -> the video
    ``output`` (its extension picks the format), and the first clip's frames (under its
    ``originals``' when given) -> :func:`grid_path` ``(output)``; both written to ``stage``'s
    temporary names (``outputs.staging``). Returns the two paths."""
    from titok_jax.evaluation.images import make_grid, save_png, tile_grid
    first = clips[0, :GRID_FRAMES]
    grid = tile_grid(first, ncol=len(first)) if originals is None else \
        make_grid(originals[0, :GRID_FRAMES], first, ncol=len(first))
    outputs = [os.fspath(output), grid_path(output)]
    write_video(stage.path(outputs[0]), clips.reshape((-1, *clips.shape[2:])), fps)
    save_png(stage.path(outputs[1]), grid)
    return outputs


def reconstruct_video(tokenizer: Any, path: str, output: str) -> list[str]:
    """Encode + decode the video ``path`` (a file or a frame folder) clip by clip
    (:func:`video_clips`); write the reconstructed frames to the video ``output`` and the first
    clip's frames (originals over reconstructions) to :func:`grid_path` ``(output)``
    (:func:`write_clips`). Both are renamed into place only once all is done
    (``outputs.staging``); returns the two paths."""
    from titok_jax.outputs import staging
    if not is_video_file(output):
        raise ValueError(f"--output {output}: a video input needs a video output "
                         f"({', '.join(VIDEO_EXTENSIONS)})")
    clips, fps = tokenizer_clips(tokenizer, path)
    rec = tokenizer.reconstruct(clips)
    with staging() as stage:
        return write_clips(stage, output, rec, fps, originals=clips)
