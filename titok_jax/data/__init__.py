"""Input pipeline: image sources, NumPy-only transforms, grain pipelines, host -> global arrays.

``data.source`` specs: ``sample`` (scikit-image photographs, fixed train/eval split),
``folder:PATH`` (recursive jpg/jpeg/png/webp), ``tfds:NAME[:split]`` (``tfds.data_source``).
"""
from titok_jax.data.hosts import batch_sharding, local_batch_size, make_global_batch, to_global_array
from titok_jax.data.pipeline import (
    eval_iterator_from_config,
    make_eval_dataset,
    make_eval_iterator,
    make_train_dataset,
    make_train_iterator,
    train_iterator_from_config,
)
from titok_jax.data.sample_images import EVAL_IMAGES, TRAIN_IMAGES, load_sample_image
from titok_jax.data.sources import (
    CorruptImageWarning,
    FolderSource,
    SampleSource,
    TfdsSource,
    decode_image_file,
    make_source,
    parse_source_spec,
    to_rgb_uint8,
)
from titok_jax.data.transforms import (
    EvalTransform,
    TrainTransform,
    center_crop,
    horizontal_flip,
    random_crop,
    random_resized_square_crop,
    resize_shorter_side,
    rotate_hue,
    to_float,
)

__all__ = [
    "CorruptImageWarning", "EVAL_IMAGES", "EvalTransform", "FolderSource", "SampleSource",
    "TRAIN_IMAGES", "TfdsSource", "TrainTransform", "batch_sharding", "center_crop",
    "decode_image_file", "eval_iterator_from_config", "horizontal_flip", "load_sample_image",
    "local_batch_size", "make_eval_dataset", "make_eval_iterator", "make_global_batch",
    "make_source", "make_train_dataset", "make_train_iterator", "parse_source_spec",
    "random_crop", "random_resized_square_crop", "resize_shorter_side", "rotate_hue", "to_float",
    "to_global_array", "to_rgb_uint8", "train_iterator_from_config",
]
