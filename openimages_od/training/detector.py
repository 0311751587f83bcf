"""The inference graph shared by ``evaluate`` and ``export``.

:class:`DetectorModule` wraps a Model Garden RetinaNet with the same
preprocessing as its validation parser (normalize, resize keeping the aspect
ratio, pad to a multiple of the coarsest feature stride) and maps the boxes
back to the input image, normalized ``[ymin, xmin, ymax, xmax]`` in ``[0, 1]``.
Evaluation calls the very functions the SavedModel exports, so the metrics
describe what is served.

Signatures (the serving contract):

* ``serving_default(image_bytes: tf.string [None])``: encoded JPEG/PNG, each
  decoded and resized in the graph; images may differ in size.
* ``serving_images(images: tf.uint8 [None, None, None, 3])``.

Both return ``detection_boxes`` float32 [B, N, 4], ``detection_classes``
int32 [B, N] (label-map ids), ``detection_scores`` float32 [B, N] and
``num_detections`` int32 [B].
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf
import tf_keras
from official.vision.modeling import factory
from official.vision.ops import preprocess_ops

__all__ = ["SIGNATURES", "DetectorModule", "build_model", "restore_model"]

SIGNATURES = {
    "serving_default": {
        "inputs": {"image_bytes": {"dtype": "string", "shape": [None]}},
        "outputs": {
            "detection_boxes": {"dtype": "float32", "shape": [None, None, 4]},
            "detection_classes": {"dtype": "int32", "shape": [None, None]},
            "detection_scores": {"dtype": "float32", "shape": [None, None]},
            "num_detections": {"dtype": "int32", "shape": [None]},
        },
        "box_format": "normalized [ymin, xmin, ymax, xmax] relative to the input image",
    },
    "serving_images": {
        "inputs": {"images": {"dtype": "uint8", "shape": [None, None, None, 3]}},
        "outputs": "same as serving_default",
    },
}


def build_model(params: Any, input_size: int) -> tf_keras.Model:
    """The RetinaNet Keras model for ``params`` (an ExperimentConfig) with a fixed square input."""
    input_specs = tf_keras.layers.InputSpec(shape=[None, input_size, input_size, 3])
    return factory.build_retinanet(input_specs=input_specs, model_config=params.task.model)


def restore_model(model: tf_keras.Model, checkpoint_path: str) -> None:
    """Load the model weights of a training checkpoint (optimizer state is ignored)."""
    ckpt = tf.train.Checkpoint(model=model)
    ckpt.read(checkpoint_path).expect_partial().assert_existing_objects_matched()


class DetectorModule(tf.Module):
    """RetinaNet + preprocessing + box mapping, exportable as a SavedModel.

    Args:
        model: the RetinaNet Keras model built by :func:`build_model`.
        input_size: the model's square input side: images are resized to fit it (longest side,
            aspect kept) and zero-padded to the square. ``train.input_size`` is validated to be a
            multiple of 128 (RetinaNet's P7 stride), so the square needs no further padding.
    """

    def __init__(self, model: tf_keras.Model, input_size: int) -> None:
        super().__init__(name="oiod_detector")
        self.model = model
        self.input_size = int(input_size)

    def _preprocess_one(self, image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image = tf.ensure_shape(image, [None, None, 3])
        image = preprocess_ops.normalize_image(image)
        image, info = preprocess_ops.resize_and_crop_image(
            image,
            [self.input_size, self.input_size],
            padded_size=[self.input_size, self.input_size],
            aug_scale_min=1.0,
            aug_scale_max=1.0,
            keep_aspect_ratio=True,
        )
        image = tf.ensure_shape(image, [self.input_size, self.input_size, 3])
        return image, tf.ensure_shape(info, [4, 2])

    def _decode_one(self, data: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        # decode_image handles JPEG/PNG/GIF/BMP; expand_animations=False keeps 3-D.
        image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
        return self._preprocess_one(image)

    def _run(self, images: tf.Tensor, info: tf.Tensor) -> dict[str, tf.Tensor]:
        outputs = self.model(images, image_shape=info[:, 1, :], training=False)
        boxes = tf.cast(outputs["detection_boxes"], tf.float32)
        scale = tf.tile(info[:, 2:3, :], [1, 1, 2])  # [B, 1, 4]: y, x, y, x scale
        original = tf.tile(info[:, 0:1, :], [1, 1, 2])  # [B, 1, 4]: h, w, h, w
        boxes = tf.clip_by_value(boxes / scale / original, 0.0, 1.0)
        num = tf.cast(outputs["num_detections"], tf.int32)
        # Rows past num_detections are padding: make them unmistakable (class 0, score 0, empty box).
        valid = tf.sequence_mask(num, tf.shape(boxes)[1])
        classes = tf.where(valid, tf.cast(outputs["detection_classes"], tf.int32), 0)
        scores = tf.where(valid, tf.cast(outputs["detection_scores"], tf.float32), 0.0)
        boxes = tf.where(valid[..., None], boxes, 0.0)
        return {
            "detection_boxes": boxes,
            "detection_classes": classes,
            "detection_scores": scores,
            "num_detections": num,
        }

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def detect_bytes(self, image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        """Detections for a batch of encoded images (each may have its own size)."""
        images, info = tf.map_fn(
            self._decode_one,
            image_bytes,
            fn_output_signature=(
                tf.TensorSpec([self.input_size, self.input_size, 3], tf.float32),
                tf.TensorSpec([4, 2], tf.float32),
            ),
            parallel_iterations=8,
        )
        return self._run(images, info)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def detect_images(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        """Detections for a batch of same-sized uint8 RGB images."""
        prepped, info = tf.map_fn(
            self._preprocess_one,
            images,
            fn_output_signature=(
                tf.TensorSpec([self.input_size, self.input_size, 3], tf.float32),
                tf.TensorSpec([4, 2], tf.float32),
            ),
            parallel_iterations=8,
        )
        return self._run(prepped, info)

    def signatures(self) -> dict[str, Any]:
        return {
            "serving_default": self.detect_bytes.get_concrete_function(),
            "serving_images": self.detect_images.get_concrete_function(),
        }


def latest_checkpoint(model_dir: str) -> str | None:
    """``tf.train.latest_checkpoint`` on a local folder."""
    return tf.train.latest_checkpoint(model_dir)
