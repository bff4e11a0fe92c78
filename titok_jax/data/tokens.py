"""Tokens as data: pre-tokenized shards written by ``titok-jax tokenize --data SOURCE`` and read by
the generator trainer through grain.

A token data set is a directory::

    DIR/meta.json              {"format": "titok_jax.tokens/1", "count": n, "num_tokens": T,
                                "codebook_size": K, "num_classes": C, "shards": [...], ...}
    DIR/tokens_00000.npy       int32 [n_0, T] token ids (VQ) in [0, K); [n_0, T, k] for a
                               multi-index tokenizer (fq / rq: meta "num_codebooks": k, each id
                               in [0, K); absent for k = 1)
    DIR/labels_00000.npy       int32 [n_0] class ids in [0, C), or -1 when the source has none
    ...

A video tokenizer's ids ``[n, T', h, w]`` are stored flattened, ``[n, T' h w]`` (time first), with
``"latent_shape": [T', h, w]`` and ``"num_frames": T`` in ``meta.json``; ``tokenize --data
sample_video`` (or ``video_folder:PATH``) writes them from clips
(``data.video.clip_batches_for_tokenizing``).

Shards are plain ``.npy`` files opened memory-mapped, so a data set larger than RAM reads only the
rows a batch needs. ``meta.json`` is written last: a directory without it is an interrupted write
and is refused by the reader. Each augmented pass over the source (``epochs``) is one more set of
rows (a different random crop / flip of every image), as in TiTok's pre-tokenization.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Iterator

import grain
import numpy as np

from titok_jax.data.hosts import local_batch_size, process_info

FORMAT = "titok_jax.tokens/1"
META = "meta.json"


def token_shape(meta: dict[str, Any]) -> tuple[int, ...]:
    """One row's ids: ``(T,)``, or ``(T, k)`` for ``num_codebooks`` k > 1 (fq / rq tokenizers)."""
    k = int(meta.get("num_codebooks", 1) or 1)
    return (int(meta["num_tokens"]),) if k == 1 else (int(meta["num_tokens"]), k)


def _shard_names(i: int) -> tuple[str, str]:
    return f"tokens_{i:05d}.npy", f"labels_{i:05d}.npy"


def check_new_token_dir(out_dir: str) -> None:
    """ValueError unless ``out_dir`` is missing or an empty directory (shards are never overwritten)."""
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir} is a file; token shards need an output directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ValueError(f"{out_dir} is not empty; choose a new directory for the token shards")


class TokenShardWriter:
    """Accumulate ``(tokens [b, T], labels [b])`` batches (``tokens [b, T, k]``: the k ids per
    token of a multi-index tokenizer); write a shard every ``shard_size`` rows.

    ``close(meta)`` flushes the last shard and writes ``meta.json`` (with ``count``, ``num_tokens``,
    ``num_codebooks`` when k > 1, and the shard list added to ``meta``). The directory must not
    hold a token data set already.
    """

    def __init__(self, out_dir: str, shard_size: int = 65536):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        check_new_token_dir(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.shard_size = out_dir, int(shard_size)
        self._tokens: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._pending = 0
        self.shards: list[dict[str, Any]] = []
        self.count = 0
        self.num_tokens: int | None = None
        self.row_shape: tuple[int, ...] | None = None   # (T,) or (T, k)
        self.max_label = -1

    def add(self, tokens: np.ndarray, labels: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        labels = np.asarray(labels, np.int32).reshape(-1)
        if tokens.ndim not in (2, 3) or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"token shards hold integer ids [B, T] (or [B, T, k]); got {tokens.dtype} "
                             f"{tokens.shape} (continuous VAE tokens cannot be written as token shards)")
        if labels.shape[0] != tokens.shape[0]:
            raise ValueError(f"{tokens.shape[0]} token rows but {labels.shape[0]} labels")
        if self.row_shape is None:
            self.row_shape = tuple(int(d) for d in tokens.shape[1:])
            self.num_tokens = self.row_shape[0]
        elif tuple(tokens.shape[1:]) != self.row_shape:
            raise ValueError(f"rows of ids {list(tokens.shape[1:])} after rows of {list(self.row_shape)}")
        if labels.size:
            self.max_label = max(self.max_label, int(labels.max()))
        self._tokens.append(tokens.astype(np.int32))
        self._labels.append(labels)
        self._pending += tokens.shape[0]
        while self._pending >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, n: int) -> None:
        tokens = np.concatenate(self._tokens)
        labels = np.concatenate(self._labels)
        tname, lname = _shard_names(len(self.shards))
        np.save(os.path.join(self.out_dir, tname), tokens[:n])
        np.save(os.path.join(self.out_dir, lname), labels[:n])
        self.shards.append({"tokens": tname, "labels": lname, "count": int(n)})
        self.count += int(n)
        self._tokens, self._labels = [tokens[n:]], [labels[n:]]
        self._pending = int(tokens.shape[0] - n)

    def close(self, meta: dict[str, Any]) -> dict[str, Any]:
        if self._pending:
            self._flush(self._pending)
        if self.count == 0:
            raise ValueError("no token rows were written")
        if not meta.get("num_classes") and self.max_label >= 0:
            meta = {**meta, "num_classes": self.max_label + 1}
        meta = {**meta, "format": FORMAT, "count": self.count, "num_tokens": self.num_tokens,
                "shards": self.shards}
        if len(self.row_shape) == 2:   # multi-index ids [n, T, k]
            meta["num_codebooks"] = self.row_shape[1]
        tmp = os.path.join(self.out_dir, META + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, os.path.join(self.out_dir, META))
        return meta


def read_token_meta(path: str) -> dict[str, Any]:
    """``meta.json`` of a token data set, with a one-line error for anything else: the counts must
    be non-negative integers and every shard file a plain name inside ``path`` (never a path taken
    from the file: ``/etc/x``, ``../x`` and ``sub/x`` are refused), each named once."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"token data set {path} does not exist (write one with "
                                "`titok-jax tokenize --data SOURCE --output DIR`)")
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise ValueError(f"{path} is not a token data set (no {META}; an interrupted tokenize run?)")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{meta_path}: format {got!r}, expected {FORMAT!r}")
    _check_meta(meta, meta_path)
    return meta


def _int_field(value: Any, what: str, low: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{what} must be an integer >= {low}, got {value!r}")


def _check_meta(meta: dict[str, Any], meta_path: str) -> None:
    """The fields the reader trusts: integer counts and shard names that stay inside the data set."""
    from titok_jax.data.paths import check_names
    _int_field(meta.get("count"), f"{meta_path}: count", 0)
    _int_field(meta.get("num_tokens"), f"{meta_path}: num_tokens", 1)
    _int_field(meta.get("codebook_size"), f"{meta_path}: codebook_size", 1, optional=True)
    _int_field(meta.get("num_codebooks"), f"{meta_path}: num_codebooks", 1, optional=True)
    _int_field(meta.get("num_classes") or 0, f"{meta_path}: num_classes", 0)
    latent = meta.get("latent_shape")
    if latent is not None:
        if not isinstance(latent, list) or not latent:
            raise ValueError(f"{meta_path}: latent_shape must be a list of sizes, got {latent!r}")
        for i, d in enumerate(latent):
            _int_field(d, f"{meta_path}: latent_shape[{i}]", 1)
        if int(np.prod(latent)) != meta.get("num_tokens"):
            raise ValueError(f"{meta_path}: latent_shape {latent} does not hold num_tokens "
                             f"{meta.get('num_tokens')} tokens")
    shards = meta.get("shards")
    if not isinstance(shards, list) or not all(
            isinstance(s, dict) and isinstance(s.get("tokens"), str) and isinstance(s.get("labels"), str)
            for s in shards):
        raise ValueError(f"{meta_path}: 'shards' must be a list of {{\"tokens\": name, \"labels\": name, "
                         "\"count\": n}}")
    names = [n for s in shards for n in (s["tokens"], s["labels"])]
    where = f"the token data set {os.path.dirname(meta_path)}"
    check_names(names, f"{meta_path}: shard files", where=where)
    for i, name in enumerate(names):
        if os.path.basename(name) != name or name in (".", ".."):
            raise ValueError(f"{meta_path}: shard files[{i}] = {name!r} is not a plain file name: it "
                             f"would lead outside {where} or into a sub-folder")
    for i, s in enumerate(shards):
        _int_field(s.get("count"), f"{meta_path}: shards[{i}].count", 0)


def check_token_shard(tokens: np.ndarray, labels: np.ndarray, codebook_size: int | None,
                      num_classes: int, where: str, labels_where: str | None = None,
                      chunk_rows: int | None = None) -> None:
    """ValueError naming ``where`` (``labels_where`` for a label) and the first bad row unless
    every token id of ``tokens`` ``[n, T]`` (or ``[n, T, k]``) is an integer in
    ``[0, codebook_size)`` (``>= 0`` when
    the size is unknown) and every label is ``-1`` (none) or in ``[0, num_classes)``. Vectorised
    over chunks of rows (min/max first; the bad row is only searched for in a chunk that fails),
    so a memory-mapped shard is read once, a few MB at a time."""
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{where}: token ids must be integers, got {tokens.dtype}")
    labels_where = labels_where or where
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{labels_where}: labels must be integers, got {labels.dtype}")
    high = None if codebook_size is None else int(codebook_size) - 1
    per_row = int(np.prod(tokens.shape[1:])) if tokens.ndim > 1 else 1
    step = chunk_rows or max(1, (1 << 22) // max(1, per_row))
    for start in range(0, tokens.shape[0], step):
        chunk = np.asarray(tokens[start:start + step])
        if chunk.size and (chunk.min() < 0 or (high is not None and chunk.max() > high)):
            bad = (chunk < 0) | ((chunk > high) if high is not None else False)
            flat = bad.reshape(bad.shape[0], -1)
            row = int(np.argmax(flat.any(axis=1)))
            pos = np.unravel_index(int(np.argmax(flat[row])), bad.shape[1:])
            where_in_row = ", ".join(str(int(p)) for p in pos)
            valid = f"0..{high} (codebook_size {high + 1})" if high is not None else ">= 0"
            raise ValueError(f"{where}: row {start + row} holds token id {int(chunk[(row, *pos)])} at "
                             f"position {where_in_row}, out of range: valid ids are {valid}")
    top = int(num_classes) - 1
    for start in range(0, labels.shape[0], 1 << 22):
        chunk = np.asarray(labels[start:start + (1 << 22)])
        if chunk.size and (chunk.min() < -1 or chunk.max() > top):
            row = int(np.argmax((chunk < -1) | (chunk > top)))
            valid = f"-1 (no class) or 0..{top}" if top >= 0 else "-1 (the data set has no classes)"
            raise ValueError(f"{labels_where}: row {start + row} has label {int(chunk[row])}, out of range: "
                             f"valid labels are {valid} (num_classes {num_classes})")


class TokenSource:
    """Random access over a token data set: record ``i`` is ``{"tokens": int32 [T] (or [T, k],
    ``num_codebooks`` > 1), "label": int32, "index": int64}``. Shards are memory-mapped; the object pickles by path (grain workers).

    Opening it checks every shard once (:func:`check_token_shard`: ids in ``[0, codebook_size)``,
    labels ``-1`` or in ``[0, num_classes)``, integer dtypes, regular files), so ids a generator's
    embedding cannot hold never reach training; ``verify=False`` skips the value scan (the copies
    grain's workers unpickle were checked in the parent)."""

    def __init__(self, path: str, verify: bool = True):
        self.path = os.fspath(path)
        self.verify = bool(verify)
        self.meta = read_token_meta(self.path)
        self.num_tokens = int(self.meta["num_tokens"])
        self.row_shape = token_shape(self.meta)
        self.num_codebooks = int(self.meta.get("num_codebooks", 1) or 1)
        self.codebook_size = self.meta.get("codebook_size")
        self.num_classes = int(self.meta.get("num_classes", 0) or 0)
        counts = [int(s["count"]) for s in self.meta["shards"]]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if int(self._starts[-1]) != int(self.meta["count"]):
            raise ValueError(f"{self.path}: shard counts sum to {int(self._starts[-1])}, "
                             f"meta.json says {self.meta['count']}")
        self._open()

    def _load(self, name: str) -> np.ndarray:
        from titok_jax.data.paths import file_kind, is_regular_file
        path = os.path.join(self.path, name)
        if not is_regular_file(path):  # a FIFO would block np.load forever
            raise ValueError(f"{path}: shard is a {file_kind(path)}, not a regular .npy file")
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            lines = [line for line in str(e).splitlines() if line.strip()]
            raise ValueError(f"cannot read shard {path}: {lines[0] if lines else type(e).__name__}") from None

    def _open(self) -> None:
        self._tokens, self._labels = [], []
        for s in self.meta["shards"]:
            t, lab = self._load(s["tokens"]), self._load(s["labels"])
            if t.shape != (int(s["count"]), *self.row_shape) or lab.shape != (int(s["count"]),):
                ids = (f"{self.num_tokens} tokens" if self.num_codebooks == 1 else
                       f"{self.num_tokens} tokens x {self.num_codebooks} ids")
                raise ValueError(f"{self.path}/{s['tokens']}: shape {t.shape} does not match meta.json "
                                 f"({s['count']} rows of {ids})")
            if self.verify:
                check_token_shard(t, lab, self.codebook_size, self.num_classes,
                                  os.path.join(self.path, s["tokens"]), os.path.join(self.path, s["labels"]))
            self._tokens.append(t)
            self._labels.append(lab)

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"], verify=False)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} token rows")
        shard = int(np.searchsorted(self._starts, index, side="right") - 1)
        row = index - int(self._starts[shard])
        return {"tokens": np.asarray(self._tokens[shard][row], np.int32),
                "label": np.int32(self._labels[shard][row]), "index": np.int64(index)}

    def __repr__(self) -> str:
        return f"TokenSource({self.path!r}, rows={len(self)}, num_tokens={self.num_tokens})"


def make_token_train_dataset(path: str, global_batch_size: int, seed: int, *, shuffle: bool = True,
                             process_index: int | None = None, process_count: int | None = None,
                             num_epochs: int | None = None) -> grain.IterDataset:
    """Per-process batches ``{"tokens": int32 [b, T] (or [b, T, k]), "label": int32 [b], "index":
    int64 [b]}``,
    shuffled with ``seed`` and repeated (``num_epochs=None``: forever); checkpointable like the
    image pipeline."""
    p, n = process_info(process_index, process_count)
    local = local_batch_size(global_batch_size, n)
    src = TokenSource(path)
    ds = grain.MapDataset.source(src)
    if shuffle:
        ds = ds.shuffle(seed=int(seed))
    ds = ds.repeat(num_epochs)
    if num_epochs is not None:
        whole = (len(ds) // global_batch_size) * global_batch_size
        if whole == 0:
            raise ValueError(f"{len(ds)} token rows is less than one global batch of {global_batch_size}")
        ds = ds[:whole]
    ds = ds[p::n].batch(local, drop_remainder=True)
    return ds.to_iter_dataset()


def write_token_dataset(out_dir: str, encode: Any, batches: Iterable[dict[str, np.ndarray]],
                        meta: dict[str, Any], shard_size: int = 65536,
                        progress: Any = None) -> dict[str, Any]:
    """Encode image batches (``{"image": [B,S,S,3] in [0,1], "label": [B], "mask"?: [B]}``) with
    ``encode(images) -> int [B, T]`` (or ``[B, T, k]``: multi-index ids) and write them as
    shards; returns the final meta."""
    writer = TokenShardWriter(out_dir, shard_size)
    for batch in batches:
        images, labels = np.asarray(batch["image"]), np.asarray(batch["label"])
        keep = np.asarray(batch["mask"], bool) if "mask" in batch else np.ones(len(images), bool)
        tokens = np.asarray(encode(images))
        writer.add(tokens[keep], labels[keep])
        if progress is not None:
            progress(int(keep.sum()))
    return writer.close(meta)


def image_batches_for_tokenizing(source: Any, image_size: int, batch_size: int, *, split: str = "train",
                                 epochs: int = 1, augment: bool = True, seed: int = 0,
                                 data_dir: str | None = None, crop_scale: tuple[float, float] | None = None
                                 ) -> tuple[Iterator[dict[str, np.ndarray]], int, Any]:
    """Every record of ``source``/``split``, ``epochs`` times, as image batches (the last one
    short): ``augment`` = the training transform (random crop of the source's default scale range,
    random flip; record ``e * len + i`` is seeded by its position, so every pass differs), else
    resize + centre crop (``epochs`` must then be 1). Returns ``(batches, rows, source_object)``."""
    from titok_jax.data.sources import make_source
    from titok_jax.data.transforms import EvalTransform, TrainTransform

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not augment and epochs != 1:
        raise ValueError("without augmentation every pass gives the same tokens; use epochs=1")
    src = make_source(source, split, data_dir=data_dir)
    if len(src) == 0:
        raise ValueError(f"data source {source!r} split {split!r} is empty")
    ds = grain.MapDataset.source(src).repeat(epochs)
    if augment:
        scale = crop_scale or getattr(src, "default_crop_scale", (1.0, 1.0))
        ds = ds.map_with_index(TrainTransform(image_size, seed, crop_scale=scale, flip=True))
    else:
        transform = EvalTransform(image_size)
        ds = ds.map_with_index(transform)
    ds = ds.batch(batch_size, drop_remainder=False)
    return iter(ds), len(src) * epochs, src


def tokenize_source(out_dir: str, encode: Callable[[np.ndarray], Any], source: str, *, image_size: int,
                    batch_size: int = 32, split: str = "train", epochs: int = 1, augment: bool = True,
                    seed: int = 0, data_dir: str | None = None, shard_size: int = 65536,
                    meta: dict[str, Any] | None = None, progress: bool = False,
                    num_frames: int = 0, frame_stride: int = 1) -> dict[str, Any]:
    """Every image of ``source``/``split`` (``epochs`` passes, see
    :func:`image_batches_for_tokenizing`) encoded by ``encode(float32 [B,S,S,3] in [0,1]) -> int
    [B, T]`` (``[B, T, k]`` for a multi-index tokenizer) into a token data set at ``out_dir``. ``meta.json`` records the source, split, epochs,
    augmentation, seed and ``num_classes`` (the source's, else the largest label + 1) plus the
    entries of ``meta`` (e.g. ``tokenizer``, ``tokenizer_step``, ``codebook_size``); returns it.
    ``progress``: a bar on stderr when stderr is a terminal.

    ``num_frames = T > 0`` (a video tokenizer; ``source`` a clip source): clips of ``T`` frames
    (``data.video.clip_batches_for_tokenizing``), ``encode`` -> ``[B, T', h, w]`` stored flattened with
    ``latent_shape`` and ``num_frames`` in the meta."""
    import sys

    from tqdm import tqdm

    from titok_jax.data.video import is_video_spec

    video = int(num_frames or 0) > 0
    if video != is_video_spec(source):
        raise ValueError(f"data source {source!r} is {'clips' if not video else 'images'}, but "
                         f"the tokenizer takes {'clips' if video else 'images'} (video tokenizers: "
                         f"sample_video or video_folder:PATH; image tokenizers: sample, folder:PATH, "
                         f"tfds:NAME)")
    if video:
        from titok_jax.data.video import clip_batches_for_tokenizing
        batches, rows, src = clip_batches_for_tokenizing(
            source, image_size, batch_size, num_frames=int(num_frames), frame_stride=frame_stride,
            split=split, epochs=epochs, augment=augment, seed=seed)
        latent: list[int] = []

        def encode_flat(x: np.ndarray) -> np.ndarray:
            ids = np.asarray(encode(np.asarray(x, np.float32)))
            latent[:] = [int(d) for d in ids.shape[1:]]
            return ids.reshape(ids.shape[0], -1)
    else:
        batches, rows, src = image_batches_for_tokenizing(
            source, image_size, batch_size, split=split, epochs=epochs, augment=augment, seed=seed,
            data_dir=data_dir)
    num_classes = getattr(src, "num_classes", None)
    if num_classes is None and getattr(src, "class_names", None) is not None:
        num_classes = len(src.class_names)
    meta = {**(meta or {}), "image_size": image_size, "source": source, "split": split,
            "epochs": epochs, "augment": augment, "seed": seed, "num_classes": int(num_classes or 0)}
    bar = tqdm(total=rows, unit="clip" if video else "img", desc="tokenize", file=sys.stderr,
               disable=not (progress and sys.stderr.isatty()))
    try:
        if not video:
            return write_token_dataset(out_dir, lambda x: encode(np.asarray(x, np.float32)), batches,
                                       meta, shard_size=shard_size, progress=bar.update)
        writer = TokenShardWriter(out_dir, shard_size)
        for batch in batches:
            writer.add(encode_flat(batch["image"]), np.asarray(batch["label"]))
            bar.update(len(batch["label"]))
        return writer.close({**meta, "num_frames": int(num_frames), "frame_stride": int(frame_stride),
                             "latent_shape": latent})
    finally:
        bar.close()
