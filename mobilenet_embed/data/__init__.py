"""Input pipeline: image index and checks, preprocessing, P x K sampling, tf.data pipelines.

Public API (see each module for details):

- `build_index(data_cfg, check=True) -> (ImageIndex, DataReport)`; `inspect_data` /
  `validate_report` (the two halves of it); `split_identities(index, fraction, seed)`.
- `preprocess_images(images, image_size, crop_fraction=1.0)`: the one preprocessing function
  of training, evaluation and export; `augment_images(images, seed, image_size, ...)`: training
  augmentation.
- `pk_batches(cfg, index=None, start_step=0, num_replicas=1, worker_index=0, num_workers=1,
  counters=None)`: endless P x K training batches; `DataCounters`.
- `images_dataset(data_cfg, paths, batch_size, check=True)`: preprocessed batches in order.
- `prepare_tfrecords(...)`: writes TFRecord shards and manifest (`mbembed prepare`).
"""

from mobilenet_embed.data.decode import IMAGE_EXTENSIONS, check_files, decode_image_bytes, pillow_decode_file
from mobilenet_embed.data.index import (DataReport, ImageIndex, build_index, inspect_data, read_identity_list,
                                        split_identities, validate_report)
from mobilenet_embed.data.pipeline import DataCounters, images_dataset, pk_batches, train_val_indexes
from mobilenet_embed.data.preprocess import augment_images, central_crop_box, flip_images, preprocess_images
from mobilenet_embed.data.synthetic import SyntheticTables
from mobilenet_embed.data.tfrecord import load_manifest
from mobilenet_embed.data.tfrecord_write import prepare_tfrecords

__all__ = [
    "IMAGE_EXTENSIONS", "check_files", "decode_image_bytes", "pillow_decode_file",
    "DataReport", "ImageIndex", "build_index", "inspect_data", "read_identity_list", "split_identities",
    "validate_report", "DataCounters", "images_dataset", "pk_batches", "train_val_indexes",
    "augment_images", "central_crop_box", "flip_images", "preprocess_images", "SyntheticTables",
    "load_manifest", "prepare_tfrecords",
]
